"""`loracli serve` as users run it: a subprocess on a loopback port, driven by the openai client,
a few hundred good and hostile requests at once, a client that leaves mid-stream, and SIGTERM.

The server is started once for the module and stopped by its pid in the last test (SIGTERM
must drain what is in flight and exit 0)."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import httpx
import pytest

from lora_cli.serve.streams import Row
from tests.serve.runs import bomb_png, png_bytes
from tests.serve.server_proc import ServerProcess

pytestmark = pytest.mark.slow

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 200  # tokens: a greedy lm-a stream that outlasts its client
IMAGE_RUNS = ["img-a", "img-b", "img-c", "img-loha", "img-loha2"]
TEXTS = ["the film was good", "the day was very awful", "the trip was"]
PROMPTS = ["the film was", "the day was very"]


@pytest.fixture(scope="module")
def server(serve_runs, tmp_path_factory):
    proc = ServerProcess(serve_runs, tmp_path_factory.mktemp("serve-log") / "serve.log", "--max-batch", "16",
                         "--max-wait-ms", "5", "--max-body-mb", "1", "--max-tokens", "220",
                         env={"LORACLI_API_KEY": KEY})
    try:
        yield proc.wait_ready()
    finally:
        proc.terminate()


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_the_openai_client_works_unchanged(server, backend):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in client.models.list()} >= {"lm-a", "lm-b", "img-a"}
    plain = client.completions.create(model="lm-a", prompt="the film was", max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="lm-a", prompt="the film was", max_tokens=6, temperature=0, stream=True))
    assert plain.choices[0].text == streamed
    expected = _greedy(backend, "lm-a", backend.prompt_ids(backend.runs["lm-a"], "the film was"), 6)
    assert plain.choices[0].text == expected
    assert plain.usage.completion_tokens >= 1

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the day was"}]
    chat = client.chat.completions.create(model="lm-b", messages=messages, max_tokens=5, temperature=0)
    chat_stream = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="lm-b", messages=messages, max_tokens=5, temperature=0, stream=True))
    assert chat.choices[0].message.content == chat_stream
    assert chat.choices[0].message.content == _greedy(backend, "lm-b", backend.chat_ids(backend.runs["lm-b"], messages), 5)

    from openai import NotFoundError

    with pytest.raises(NotFoundError, match="no run called"):
        client.completions.create(model="lm-z", prompt="x", max_tokens=2)


def _greedy(backend, name: str, prompt_ids: list[int], max_tokens: int) -> str:
    run = backend.runs[name]
    row = Row(prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=0, decode=lambda ids: backend.decode(run, ids),
              eos_ids=backend.eos_ids(run))
    backend.generate([run], [row])
    return row.text


def _expected(backend) -> dict:
    """What the good requests must get, from the backend in this process, one request at a time."""
    out = {}
    for name in IMAGE_RUNS:
        run = backend.runs[name]
        for seed in range(5):
            out[name, seed] = backend.classify([run], [backend.image_input(run, png_bytes(seed))])[0]
    for name in ("cls-a", "cls-b"):
        run = backend.runs[name]
        for text in TEXTS:
            out[name, text] = backend.classify([run], [backend.text_input(run, text)])[0]
    for name in ("lm-a", "lm-b"):
        for prompt in PROMPTS:
            out[name, prompt] = _greedy(backend, name, backend.prompt_ids(backend.runs[name], prompt), 5)
    return out


async def _one(client: httpx.AsyncClient, url: str, i: int) -> tuple[str, object, int, object]:
    """Request ``i`` of the mix: (kind, expectation key, status, answer)."""
    kind = i % 16
    if kind <= 4:
        name, seed = IMAGE_RUNS[kind], (i // 16) % 5
        r = await client.post("/v1/classify", data={"model": name, "top_k": "3"},
                              files={"image": ("x.png", png_bytes(seed), "image/png")})
        return "image", (name, seed), r.status_code, r.json()
    if kind == 5:
        name, text = ("cls-a", "cls-b")[i % 2], TEXTS[i % 3]
        r = await client.post("/v1/classify", json={"model": name, "text": text, "top_k": 2})
        return "text", (name, text), r.status_code, r.json()
    if kind == 6:
        name, prompt = ("lm-a", "lm-b")[(i // 16) % 2], PROMPTS[(i // 32) % 2]
        r = await client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 5,
                                                       "temperature": 0})
        return "completion", (name, prompt), r.status_code, r.json()
    hostile = {
        7: lambda: client.post("/v1/classify", data={"model": "img-a"}, files={"image": ("x.png", b"\x89PNGjunk", "image/png")}),
        8: lambda: client.post("/v1/classify", json={"model": "img-b", "image": base64.b64encode(bomb_png()).decode()}),
        9: lambda: client.post("/v1/classify", json={"model": "../../etc/passwd", "text": "x"}),
        10: lambda: client.post("/v1/completions", content=b"<xml/>", headers={"content-type": "application/xml"}),
        11: lambda: client.post("/v1/classify", data={"model": "img-a"},
                                files={"image": ("big.png", b"\0" * (1024 * 1024 + 10), "image/png")}),
        12: lambda: client.post("/v1/completions", json={"model": "lm-a", "prompt": "good " * 300}),
        13: lambda: client.post("/v1/classify", json={"model": "img-a", "text": "x"}, headers={"Authorization": "Bearer nope"}),
        14: lambda: client.post("/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000,
                                headers={"content-type": "application/json"}),
    }
    if kind in hostile:
        r = await hostile[kind]()
        return "hostile", kind, r.status_code, r.json()
    # a raw client that sends half a request and leaves
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    writer.write(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 5000\r\n\r\n{\"model\": ")
    await writer.drain()
    writer.close()
    return "abandoned", kind, 0, None


HOSTILE_STATUS = {7: (400, "invalid_image"), 8: (400, "invalid_image"), 9: (404, "model_not_found"),
                  10: (415, "unsupported_media_type"), 11: (413, "body_too_large"), 12: (400, "context_length_exceeded"),
                  13: (401, "invalid_api_key"), 14: (400, "invalid_json")}


def test_hundreds_of_good_and_hostile_requests_at_once(server, backend):
    expected = _expected(backend)

    async def mix():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, limits=limits, timeout=300) as client:
            return await asyncio.gather(*(_one(client, server.url, i) for i in range(320)))

    results = asyncio.run(mix())
    counts: dict[str, int] = {}
    for kind, key, status, answer in results:
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "abandoned":
            continue
        if kind == "hostile":
            assert (status, answer["error"]["code"]) == HOSTILE_STATUS[key], (key, answer)
            continue
        assert status == 200, (kind, key, answer)
        if kind == "completion":
            assert answer["choices"][0]["text"] == expected[key], key
        else:
            run = backend.runs[key[0]]
            for row in answer["top_k"]:
                assert row["probability"] == pytest.approx(float(expected[key][run.labels.index(row["label"])]), abs=1e-4)
    assert counts == {"image": 100, "text": 20, "completion": 20, "hostile": 160, "abandoned": 20}
    assert server.proc.poll() is None
    assert httpx.get(f"{server.url}/health", timeout=30).json()["status"] == "ok"
    after = httpx.post(f"{server.url}/v1/classify", headers=AUTH, data={"model": "img-a", "top_k": "3"},
                       files={"image": ("x.png", png_bytes(0), "image/png")}, timeout=60)
    assert after.status_code == 200
    forwards = metric(server.url, 'loracli_batch_size_count{group="base0"}')
    requests = sum(metric(server.url, f'loracli_model_requests_total{{model="{n}"}}') for n in ("img-a", "img-b"))
    assert forwards < requests  # img-a and img-b rows shared forwards
    log = server.log.read_text()
    assert "good good" not in log and "etc/passwd" not in log and "big.png" not in log


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    request = {"model": "lm-a", "prompt": "the film was", "max_tokens": LONG, "temperature": 0}
    whole = httpx.post(f"{server.url}/v1/completions", headers=AUTH, json=request, timeout=300).json()
    assert whole["choices"][0]["finish_reason"] == "length", "precondition: greedy lm-a runs the whole budget"
    tokens_before = metric(server.url, 'loracli_generated_tokens_total{model="lm-a"}')
    left_before = metric(server.url, 'loracli_errors_total{kind="client_disconnected"}')
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, json={**request, "stream": True},
                      timeout=300) as response:
        next(response.iter_lines())  # the first piece arrived: generation is under way; now leave
    deadline = time.monotonic() + 120
    while metric(server.url, 'loracli_errors_total{kind="client_disconnected"}') == left_before:
        assert time.monotonic() < deadline, "the server never noticed the client leaving"
        time.sleep(0.2)
    while metric(server.url, "loracli_requests_in_flight") > 1:  # this /metrics request itself
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert metric(server.url, 'loracli_generated_tokens_total{model="lm-a"}') - tokens_before < LONG


def test_sigterm_drains_in_flight_requests_then_exits_0(server):
    request = {"model": "lm-a", "prompt": "the film was", "max_tokens": LONG, "temperature": 0}
    whole = httpx.post(f"{server.url}/v1/completions", headers=AUTH, json=request, timeout=300).json()
    pieces, first = [], threading.Event()

    def stream():
        with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, json={**request, "stream": True},
                          timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    pieces.append(line[len("data: "):])
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(120)
    assert server.terminate() == 0
    reader.join(60)
    assert pieces[-1] == "[DONE]"
    chunks = [json.loads(p) for p in pieces[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]  # every piece arrived
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)
    log = server.log.read_text()
    assert "SIGTERM: finishing the requests in progress" in log and "stopped" in log
