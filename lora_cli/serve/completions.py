"""OpenAI's ``/v1/completions`` and ``/v1/chat/completions``: the request, its rows in the
batcher, and the answer, whole or as server-sent events (``"stream": true``).

Each prompt becomes a :class:`~lora_cli.serve.streams.Row` in the batcher of its run's
model; the rows hand out their text through a queue as they generate. A streamed answer is
one ``data:`` chunk per piece of text, then ``data: [DONE]``; a client that goes away mid-
stream cancels its rows, which stop at their next token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lora_cli.serve.backend import ServedRun
from lora_cli.serve.batching import Job
from lora_cli.serve.errors import RequestError, bad_request
from lora_cli.serve.gate import ServerState, json_body, new_ids, until_done
from lora_cli.serve.schemas import ChatBody, CompletionBody, parse
from lora_cli.serve.streams import CANCELLED, Row


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    body = parse(CompletionBody, await json_body(request))
    run = state.run(body.model, "generate")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    ids = await run_in_threadpool(lambda: [state.backend.prompt_ids(run, p) for p in prompts])
    return await _generate(request, state, run, body, ids, chat=False)


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    body = parse(ChatBody, await json_body(request))
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
    rid, created = new_ids()
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

    await until_done(request, asyncio.ensure_future(collect()), jobs)
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
