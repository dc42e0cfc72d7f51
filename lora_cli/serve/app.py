"""The HTTP side of ``loracli serve``: the routes and the application.

    POST /v1/classify            image (multipart upload or base64 JSON) or text -> top classes
    POST /v1/completions         OpenAI completions (SSE with "stream": true)
    POST /v1/chat/completions    OpenAI chat completions (SSE with "stream": true)
    GET  /v1/models[/{id}]       the runs: task, method, base, labels (and the run's card)
    GET  /v1/models/{id}/plots/{name}   a PNG from the run's plots/
    GET  /health, GET /metrics   liveness; Prometheus text
    GET  /                       the page to try the runs (lora_cli/serve/page)

Every request passes :class:`~lora_cli.serve.gate.Gate` first; the completion routes live
in :mod:`lora_cli.serve.completions`. Errors are JSON in OpenAI's shape (:mod:`lora_cli.serve.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from lora_cli.serve.backend import Backend, ServedRun, decode_base64_image
from lora_cli.serve.batching import Job
from lora_cli.serve.completions import chat_completions, completions
from lora_cli.serve.errors import RequestError, bad_request
from lora_cli.serve.gate import (
    BodyTooLarge,
    Gate,
    ServerState,
    Settings,
    error_response,
    json_body,
    new_ids,
    until_done,
)
from lora_cli.serve.schemas import ClassifyBody, parse

__all__ = ["Gate", "ServerState", "Settings", "build_app"]

PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
FORM_FIELD_LIMIT = 64 * 1024



# ------------------------------------------------------------------ routes
async def classify(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    run, item, top_k = await _classify_input(request, state)
    loop = asyncio.get_running_loop()
    result: asyncio.Future = loop.create_future()
    job = Job(run, item, run.batch_key(item), lambda r: _settle(result, r))
    state.submit(job)
    probs = await until_done(request, result, [job])
    values, indices = probs.topk(min(top_k, probs.shape[-1]))
    rid, created = new_ids()
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
        body = parse(ClassifyBody, await json_body(request))
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
    state.page = {name: resources.files("lora_cli.serve").joinpath("page", name).read_bytes()
                  for name in ["index.html", *PAGE_FILES]}

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
        return error_response(exc, state)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        message = {404: "no such endpoint (see GET /v1/models, POST /v1/classify, /v1/completions, "
                        "/v1/chat/completions)", 405: "this endpoint does not take that HTTP method"}
        return error_response(RequestError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code), state)

    async def left(request: Request, exc: Exception) -> Response:
        return error_response(RequestError(499, "the client closed the connection before its body arrived",
                                            "client_disconnected"), state)

    async def too_large(request: Request, exc: Exception) -> Response:
        return error_response(RequestError(413, f"the request body is over this server's limit of "
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
