"""What every request shares: the server's settings and state, the gate it passes first, and
the helpers the routes use to read a body, wait for a batch and answer errors.

The gate (:class:`Gate`) refuses a body over the limit before it is read (by its
Content-Length, or as it streams in), checks the API key (in constant time), caps the
number of requests in progress (503 past it), and writes one log line per request: the
endpoint, status, sizes and time; never a body, a prompt, a file name or a query string.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from lora_cli.serve.backend import Backend, ServedRun
from lora_cli.serve.batching import Batcher, Job
from lora_cli.serve.errors import RequestError, bad_request
from lora_cli.serve.metrics import Metrics

logger = logging.getLogger("lora_cli.serve")

ENDPOINTS = {"/": "page", "/health": "health", "/metrics": "metrics", "/v1/models": "models",
             "/v1/classify": "classify", "/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}
"""Names for the log and the metrics of requests refused before routing (other paths: "other")."""
OPEN_PATHS = ("/", "/health", "/page/")
"""Reachable without the API key: the page (it holds no data; it asks for the key) and liveness."""


@dataclass
class Settings:
    """The knobs of one server (``loracli serve`` options)."""

    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_tokens: int = 1024
    """The largest max_tokens a request may ask for."""
    max_in_flight: int = 256
    api_key: str | None = None
    allowed_hosts: list[str] | None = None
    """Host headers accepted (DNS-rebinding guard on loopback); None: any."""


class BodyTooLarge(Exception):
    """Raised while a body streams in past the limit (its Content-Length did not say so)."""


class Gate:
    """Pure ASGI middleware: body limit, API key, in-flight cap, one log line per request."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, started = self.state, time.perf_counter()
        seen = {"status": 0, "out": 0, "in": 0}

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        async def limited_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen["in"] += len(message.get("body", b""))
                if seen["in"] > state.settings.max_body_bytes:
                    raise BodyTooLarge()
            return message

        refusal = self._refusal(scope)
        try:
            if refusal is not None:
                await error_response(refusal, state)(scope, receive, counted_send)
                return
            state.in_flight += 1
            state.metrics.in_flight.inc()
            try:
                await self.app(scope, limited_receive, counted_send)
            except Exception as exc:  # noqa: BLE001 - a bug answers 500 and is logged by type: messages may quote input
                logger.error("internal error on %s: %s", getattr(scope.get("endpoint"), "__name__", "none"),
                             type(exc).__name__)
                logger.debug("internal error", exc_info=exc)
                if not seen["status"]:
                    await error_response(RequestError(500, f"internal error ({type(exc).__name__}); see the server "
                                                            "log", "internal_error"), state)(scope, receive, counted_send)
            finally:
                state.in_flight -= 1
                state.metrics.in_flight.dec()
        finally:
            endpoint = getattr(scope.get("endpoint"), "__name__", None) or ENDPOINTS.get(scope["path"], "other")
            elapsed = time.perf_counter() - started
            state.metrics.requests.labels(endpoint, str(seen["status"])).inc()
            state.metrics.latency.labels(endpoint).observe(elapsed)
            logger.info("%s %s -> %d (%d bytes in, %d out, %.0f ms)", scope["method"], endpoint, seen["status"],
                        seen["in"], seen["out"], elapsed * 1000)

    def _refusal(self, scope: dict) -> RequestError | None:
        settings, path = self.state.settings, scope["path"]
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return bad_request("the Content-Length header is not a number", "invalid_request")
        if int(length) > settings.max_body_bytes:
            return RequestError(413, f"the request body is over this server's limit of "
                                     f"{settings.max_body_bytes:,d} bytes (--max-body-mb); send a smaller file",
                                "body_too_large")
        if settings.api_key and not (path in OPEN_PATHS or path.startswith("/page/")):
            given = hashlib.sha256(headers.get(b"authorization", b"")).digest()  # equal lengths: the time
            expected = hashlib.sha256(b"Bearer " + settings.api_key.encode()).digest()  # says nothing of the key
            if not hmac.compare_digest(given, expected):
                return RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                         "with the key the server was started with (--api-key)", "invalid_api_key")
        if path.startswith("/v1/") and self.state.in_flight >= settings.max_in_flight:
            return RequestError(503, f"the server is busy ({settings.max_in_flight} requests in progress); "
                                     "retry shortly", "server_busy")
        return None


class ServerState:
    """What the routes share: the backend, one batcher per model, metrics, settings."""

    def __init__(self, backend: Backend, settings: Settings) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = Metrics()
        self.in_flight = 0
        self.batchers = {
            group.name: Batcher(group.name, self._compute, settings.max_batch, settings.max_wait_ms / 1000,
                                self.metrics.observe_batch)
            for group in backend.groups
        }
        self.page: dict[str, bytes] = {}
        """The page's files by name (set by :func:`lora_cli.serve.app.build_app`)."""

    def run(self, name: str | None, kind: str | None = None, param: str = "model") -> ServedRun:
        run = self.backend.runs.get(name or "")
        if run is None:
            known = ", ".join(sorted(self.backend.runs))
            raise RequestError(404, f"no run called {name!r} is served here; the runs are: {known} "
                                    "(GET /v1/models lists them)", "model_not_found", param)
        if kind is not None and run.kind != kind:
            use = {"image": "/v1/classify with an image", "text": "/v1/classify with text",
                   "generate": "/v1/completions or /v1/chat/completions"}[run.kind]
            raise bad_request(f"{run.name} is a {run.task} run: use {use}", "wrong_task", param)
        self.metrics.model_requests.labels(run.name).inc()
        return run

    def submit(self, job: Job) -> None:
        batcher = self.batchers[job.run.group.name]
        batcher.submit(job)
        self.metrics.queue_depth.labels(batcher.name).set(batcher.waiting)

    def _compute(self, jobs: list[Job]) -> list[Any]:
        runs = [j.run for j in jobs]
        if runs[0].kind == "generate":
            rows = [j.item for j in jobs]
            self.backend.generate(runs, rows)
            for run, row in zip(runs, rows):
                self.metrics.tokens.labels(run.name).inc(len(row.ids))
            return rows
        probs = self.backend.classify(runs, [j.item for j in jobs])
        return [p if p is not None else RequestError(500, "the model produced NaN/inf for this input",
                                                     "non_finite_output") for p in probs]


def error_response(exc: RequestError, state: ServerState) -> JSONResponse:
    state.metrics.errors.labels(exc.code).inc()
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else ({"Retry-After": "1"} if exc.status == 503 else None)
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def json_body(request: Request) -> Any:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise RequestError(415, f"send the body as JSON with 'Content-Type: application/json' (got "
                                f"{media or 'no content type'!r})", "unsupported_media_type")
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON ({type(exc).__name__} at position "
                          f"{getattr(exc, 'pos', '?')})", "invalid_json") from None
    except RecursionError:
        raise bad_request("the body's JSON is nested too deeply", "invalid_json") from None


async def until_done(request: Request, waiting: asyncio.Future, jobs: list[Job]) -> Any:
    """Await ``waiting``; if the client disconnects first, cancel its jobs (freeing their rows) and give up."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({waiting, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not waiting.done():
        for job in jobs:
            job.cancel()
        waiting.cancel()
        raise RequestError(499, "the client closed the connection", "client_disconnected")  # counted on its way out
    return waiting.result()


def new_ids() -> tuple[str, int]:
    return uuid.uuid4().hex[:24], int(time.time())


