"""The HTTP side of ``loracli serve``: routes, the gate every request passes, errors as JSON.

    POST /v1/classify            image (multipart upload or base64 JSON) or text -> top classes
    POST /v1/completions         OpenAI completions (SSE with "stream": true)
    POST /v1/chat/completions    OpenAI chat completions (SSE with "stream": true)
    GET  /v1/models[/{id}]       the runs: task, method, base, labels (and the run's card)
    GET  /v1/models/{id}/plots/{name}   a PNG from the run's plots/
    GET  /health, GET /metrics   liveness; Prometheus text
    GET  /                       the page to try the runs (lora_cli/serve/page)

Every request passes :class:`Gate` first: a body over the limit is refused before it is
read (by its Content-Length, or as it streams in), the API key is checked (constant-time),
the number of requests in progress is capped (503 past it), and one log line records the
endpoint, status, sizes and time; never a body, a prompt, a file name or a query string.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lora_cli.serve.backend import Backend, ServedRun, decode_base64_image
from lora_cli.serve.batching import Batcher, Job
from lora_cli.serve.errors import RequestError, bad_request
from lora_cli.serve.metrics import Metrics
from lora_cli.serve.schemas import ChatBody, ClassifyBody, CompletionBody, parse
from lora_cli.serve.streams import CANCELLED, Row

logger = logging.getLogger("lora_cli.serve")

ENDPOINTS = {"/": "page", "/health": "health", "/metrics": "metrics", "/v1/models": "models",
             "/v1/classify": "classify", "/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}
"""Names for the log and the metrics of requests refused before routing (other paths: "other")."""
OPEN_PATHS = ("/", "/health", "/page/")
"""Reachable without the API key: the page (it holds no data; it asks for the key) and liveness."""
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
FORM_FIELD_LIMIT = 64 * 1024


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
    pass


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
                await _error_response(refusal, state)(scope, receive, counted_send)
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
                    await _error_response(RequestError(500, f"internal error ({type(exc).__name__}); see the server "
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
        self.page = {name: resources.files("lora_cli.serve").joinpath("page", name).read_bytes()
                     for name in ["index.html", *PAGE_FILES]}

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


# ------------------------------------------------------------------ helpers
def _error_response(exc: RequestError, state: ServerState) -> JSONResponse:
    state.metrics.errors.labels(exc.code).inc()
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else ({"Retry-After": "1"} if exc.status == 503 else None)
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _json_body(request: Request) -> Any:
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


async def _until_done(request: Request, waiting: asyncio.Future, jobs: list[Job]) -> Any:
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


def _ids() -> tuple[str, int]:
    return uuid.uuid4().hex[:24], int(time.time())


# ------------------------------------------------------------------ routes
async def classify(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    run, item, top_k = await _classify_input(request, state)
    loop = asyncio.get_running_loop()
    result: asyncio.Future = loop.create_future()
    job = Job(run, item, run.batch_key(item), lambda r: _settle(result, r))
    state.submit(job)
    probs = await _until_done(request, result, [job])
    values, indices = probs.topk(min(top_k, probs.shape[-1]))
    rid, created = _ids()
    return JSONResponse({
        "id": f"cls-{rid}", "object": "classification", "created": created, "model": run.name,
        "top_k": [{"label": run.labels[i], "probability": float(v)} for v, i in zip(values.tolist(), indices.tolist())],
    })


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result if isinstance(result, RequestError) else
                             RequestError(500, f"the model failed on this batch ({type(result).__name__}); see the "
                                               "server log", "internal_error"))
    else:
        future.set_result(result)


async def _classify_input(request: Request, state: ServerState) -> tuple[ServedRun, Any, int]:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    backend = state.backend
    if media == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8, max_part_size=FORM_FIELD_LIMIT)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
        unknown = sorted(set(fields) - {"model", "top_k", "text", "text_pair"})
        if unknown:
            raise bad_request(f"unknown form field(s) {unknown}; send model, top_k and an image file (or text)",
                              "invalid_field", unknown[0])
        body = parse(ClassifyBody, fields)
        data = await upload.read() if upload is not None else None
    elif media == "application/json":
        body = parse(ClassifyBody, await _json_body(request))
        data = decode_base64_image(body.image) if body.image is not None else None
    else:
        raise RequestError(415, "send multipart/form-data (an image file) or application/json (base64 'image' or "
                                f"'text'); got {media or 'no content type'!r}", "unsupported_media_type")
    if data is not None and body.text is not None:
        raise bad_request("send an image or text, not both", "invalid_field", "text")
    run = state.run(body.model, "image" if data is not None else ("text" if body.text is not None else None))
    if data is not None:
        item = await run_in_threadpool(backend.image_input, run, data)
    elif body.text is not None:
        item = await run_in_threadpool(backend.text_input, run, body.text, body.text_pair)
    else:
        field = "an image ('image' file or base64)" if run.kind == "image" else "'text'"
        raise bad_request(f"{run.name} needs {field}", "missing_input", "image" if run.kind == "image" else "text")
    return run, item, body.top_k


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    body = parse(CompletionBody, await _json_body(request))
    run = state.run(body.model, "generate")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    ids = await run_in_threadpool(lambda: [state.backend.prompt_ids(run, p) for p in prompts])
    return await _generate(request, state, run, body, ids, chat=False)


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    body = parse(ChatBody, await _json_body(request))
    run = state.run(body.model, "generate")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    ids = await run_in_threadpool(state.backend.chat_ids, run, messages)
    return await _generate(request, state, run, body, [ids], chat=True)


def _max_tokens(state: ServerState, run: ServedRun, body: Any, n_prompt: int) -> int:
    asked = body.max_tokens if not hasattr(body, "max_completion_tokens") else (body.max_completion_tokens or body.max_tokens)
    cap = state.settings.max_tokens
    if asked is None:  # chat without a limit: what the context leaves, up to the cap
        room = run.context - n_prompt if run.context is not None else cap
        return max(1, min(cap, room))
    if asked > cap:
        raise bad_request(f"max_tokens {asked} is over this server's cap of {cap} (loracli serve --max-tokens)",
                          "max_tokens_too_large", "max_tokens")
    return asked


async def _generate(request: Request, state: ServerState, run: ServedRun, body: Any, prompts: list[list[int]],
                    chat: bool) -> Response:
    backend, loop = state.backend, asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    rows, jobs = [], []
    for index, ids in enumerate(prompts):
        max_tokens = _max_tokens(state, run, body, len(ids))
        backend.check_prompt(run, len(ids), max_tokens)

        def emit(piece: str, finish: str | None, index: int = index) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (index, piece, finish))

        rows.append(Row(prompt_ids=ids, max_tokens=max_tokens, decode=lambda t: backend.decode(run, t), emit=emit,
                        stop=body.stop, eos_ids=backend.eos_ids(run),
                        temperature=1.0 if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed))

        def failed(result: Any, index: int = index) -> None:
            if isinstance(result, BaseException):
                events.put_nowait((index, "", "error"))

        jobs.append(Job(run, rows[-1], run.batch_key(rows[-1]), failed))
    for job in jobs:
        state.submit(job)
    rid, created = _ids()
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "created": created, "model": run.name}
    if body.stream:
        return StreamingResponse(_sse(state, meta, rows, jobs, events, chat, body.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def collect() -> None:
        left = len(rows)
        while left:
            _, _, finish = await events.get()
            if finish == "error":
                raise RequestError(500, "generation failed on this batch; see the server log", "internal_error")
            left -= finish is not None

    await _until_done(request, asyncio.ensure_future(collect()), jobs)
    usage = _usage(state, run, rows)
    if chat:
        choices = [{"index": 0, "message": {"role": "assistant", "content": rows[0].text},
                    "finish_reason": rows[0].finish_reason}]
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": usage})
    choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason} for i, r in enumerate(rows)]
    return JSONResponse({**meta, "object": "text_completion", "choices": choices, "usage": usage})


def _usage(state: ServerState, run: ServedRun, rows: list[Row]) -> dict[str, int]:
    prompt, completion = sum(len(r.prompt_ids) for r in rows), sum(len(r.ids) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse(state: ServerState, meta: dict, rows: list[Row], jobs: list[Job], events: asyncio.Queue, chat: bool,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: one chunk per piece of text, then ``[DONE]``.
    If the client goes away, Starlette cancels this generator, and its rows stop generating."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, piece: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                {"content": piece} if piece else {})
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": index, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return _event({**meta, "object": kind, "choices": [choice]})

    try:
        if chat:
            yield chunk(0, None, None, first=True)
        left = len(rows)
        while left:
            index, piece, finish = await events.get()
            if finish == "error":
                yield _event({"error": RequestError(500, "generation failed on this batch; see the server log",
                                                    "internal_error").body()["error"]})
                return
            if finish == CANCELLED:
                return
            left -= finish is not None
            if piece or finish:
                yield chunk(index, piece, finish)
        if include_usage:
            yield _event({**meta, "object": kind, "choices": [], "usage": _usage(state, None, rows)})
        yield "data: [DONE]\n\n"
    finally:
        left = [job for job in jobs if not job.item.finished]
        for job in left:
            job.cancel()
        if left:  # the client went away mid-stream (Starlette cancelled this generator)
            state.metrics.errors.labels("client_disconnected").inc()


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def models(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    return JSONResponse({"object": "list", "data": [_model(run) for run in state.backend.runs.values()]})


async def model(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    run = state.run(request.path_params["model"])
    card = {**run.card, "plots": [f"/v1/models/{run.name}/plots/{name}" for name in run.plots]}
    return JSONResponse({**_model(run), "card": card})


def _model(run: ServedRun) -> dict[str, Any]:
    return {"id": run.name, "object": "model", "created": int(run.run_dir.stat().st_mtime), "owned_by": "loracli",
            "loracli": run.describe()}


async def plot(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    run = state.run(request.path_params["model"])
    path = run.plots.get(request.path_params["name"])  # only names listed at start: no path from the client
    if path is None or not path.is_file():
        raise RequestError(404, f"{run.name} has no plot of that name; its plots are {sorted(run.plots)}",
                           "plot_not_found", "name")
    return FileResponse(path, media_type="image/png")


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    return JSONResponse({"status": "ok", "runs": len(state.backend.runs), "in_flight": state.in_flight})


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    for name, batcher in state.batchers.items():
        state.metrics.queue_depth.labels(name).set(batcher.waiting)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


async def page(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    return Response(state.page["index.html"], media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


async def page_file(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    name = request.path_params["name"]
    if name not in PAGE_FILES:
        raise RequestError(404, "no such page file", "not_found")
    return Response(state.page[name], media_type=PAGE_FILES[name], headers=PAGE_HEADERS)


# ------------------------------------------------------------------ the app
def build_app(backend: Backend, settings: Settings | None = None) -> Starlette:
    """The Starlette application serving ``backend``'s runs."""
    settings = settings or Settings()
    state = ServerState(backend, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for batcher in state.batchers.values():
            batcher.start()
        try:
            yield
        finally:
            for batcher in state.batchers.values():
                await batcher.close()

    async def request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return _error_response(exc, state)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        message = {404: "no such endpoint (see GET /v1/models, POST /v1/classify, /v1/completions, "
                        "/v1/chat/completions)", 405: "this endpoint does not take that HTTP method"}
        return _error_response(RequestError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code), state)

    async def left(request: Request, exc: Exception) -> Response:
        return _error_response(RequestError(499, "the client closed the connection before its body arrived",
                                            "client_disconnected"), state)

    async def too_large(request: Request, exc: Exception) -> Response:
        return _error_response(RequestError(413, f"the request body is over this server's limit of "
                                                 f"{settings.max_body_bytes:,d} bytes (--max-body-mb)",
                                            "body_too_large"), state)

    middleware = [Middleware(Gate, state=state)]
    if settings.allowed_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts))
    app = Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/page/{name}", page_file, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model}", model, methods=["GET"]),
            Route("/v1/models/{model}/plots/{name}", plot, methods=["GET"]),
            Route("/v1/classify", classify, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        middleware=middleware,
        exception_handlers={RequestError: request_error, HTTPException: http_error, BodyTooLarge: too_large,
                            ClientDisconnect: left},
        lifespan=lifespan,
    )
    app.state.serve = state
    return app
