"""``loracli serve RUN [RUN ...]``: the runs behind one HTTP server, runs on one base batched together."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated

import typer

from lora_cli.commands.output import err, shown
from lora_cli.errors import UserInputError

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
LOOPBACK = ("127.0.0.1", "localhost")
EXTRA = ("starlette", "uvicorn", "multipart", "prometheus_client")

RunsArg = Annotated[list[str], typer.Argument(
    help="Run directories written by `loracli train`, each served under its folder name; NAME=RUN_DIR picks the "
         "name.", show_default=False, metavar="RUN...")]


def serve(
    runs: RunsArg,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 0.0.0.0 opens it to the network "
                                                     "(then set --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port, printed at start).")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most rows in one forward (or generation batch).")] = 32,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="Longest a request waits for its batch to fill.")] = 10.0,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1, mps (default: the best there is).")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LORACLI_API_KEY", show_default=False,
                                                help="Require 'Authorization: Bearer KEY' on the API (env LORACLI_API_KEY).")] = None,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body accepted.")] = 20.0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Largest max_tokens a completion may ask for.")] = 1024,
    max_in_flight: Annotated[int, typer.Option("--max-in-flight", help="Requests served at once; more get 503.")] = 256,
    drain_s: Annotated[float, typer.Option("--drain-s", help="On SIGTERM, how long requests in progress may take "
                                                             "to finish.")] = 30.0,
) -> None:
    """Serve trained runs over HTTP: classification, OpenAI-compatible completions, a page to try them.

    Runs that share a base model share it in memory; requests for different runs on it run in one forward.

    Example: loracli serve runs/food-lora runs/food-loha --port 8000, then open http://127.0.0.1:8000/

    README "Serving" shows curl and the openai client against it.
    """
    missing = [m for m in EXTRA if not _importable(m)]
    if missing:
        raise UserInputError(f"loracli serve needs {', '.join(missing)}: pip install 'loracli[serve]'")
    problems = [text for bad, text in (
        (not 0 <= port <= 65535, f"--port {port}: give 0 to 65535"),
        (max_batch < 1, f"--max-batch {max_batch}: give at least 1"),
        (not 0 <= max_wait_ms <= 10_000, f"--max-wait-ms {max_wait_ms}: give 0 to 10000"),
        (max_body_mb <= 0, f"--max-body-mb {max_body_mb}: give a positive size"),
        (max_tokens < 1, f"--max-tokens {max_tokens}: give at least 1"),
        (max_in_flight < 1, f"--max-in-flight {max_in_flight}: give at least 1"),
        (drain_s < 0, f"--drain-s {drain_s}: give 0 or more"),
        (api_key is not None and len(api_key) < 8, "--api-key: use at least 8 characters"),
    ) if bad]
    if problems:
        raise UserInputError("; ".join(problems))
    named = _named_runs(runs)

    from lora_cli.serve import server
    from lora_cli.serve.app import Settings, build_app
    from lora_cli.serve.backend import Backend

    logging.getLogger("lora_cli.serve").setLevel(logging.INFO)
    sock = server.bind(host, port)  # a port in use fails before minutes of model loading
    try:
        err.print(f"loading {len(named)} run(s)...", highlight=False)
        backend = Backend.load(named, device=device)
        for run in backend.runs.values():
            batching = "mixed batches" if run.mixable else "batches of its own"
            err.print(f"  {shown(run.name)}: {shown(run.task)}, {shown(run.method)} on {shown(run.group.name)} "
                      f"({shown(run.base)}), {batching}", highlight=False, soft_wrap=True)
        settings = Settings(max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_bytes=int(max_body_mb * 2**20),
                            max_tokens=max_tokens, max_in_flight=max_in_flight, api_key=api_key,
                            allowed_hosts=[*LOOPBACK, "[::1]"] if host in LOOPBACK else None)
        app = build_app(backend, settings)
    except BaseException:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    err.print(f"serving {len(backend.runs)} run(s) on {len(backend.groups)} base model(s) at "
              f"http://{shown_host}:{bound_port}/ (API under /v1; "
              f"{'API key required' if api_key else 'no API key'}); Ctrl+C or SIGTERM stops it", highlight=False,
              soft_wrap=True)
    server.run(app, sock, drain_s)


def _named_runs(args: list[str]) -> list[tuple[str, Path]]:
    named: list[tuple[str, Path]] = []
    for arg in args:
        name, sep, path = arg.partition("=")
        if not sep or not NAME.fullmatch(name) or Path(arg).exists():
            name, path = Path(arg).name, arg
        if not NAME.fullmatch(name):
            raise UserInputError(f"{arg}: the folder name cannot be a model name in the API (use letters, "
                                 "digits, '.', '_' and '-'); pass NAME=RUN_DIR")
        if not Path(path).is_dir():
            raise UserInputError(f"{path} is not a folder; pass run directories written by `loracli train`")
        if name in {n for n, _ in named}:
            raise UserInputError(f"two runs are called {name!r}; name them apart with NAME=RUN_DIR "
                                 f"(e.g. {name}-2={path})")
        named.append((name, Path(path)))
    return named


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
