"""The HTTP app in-process (Starlette's test client): every endpoint, its answers and its refusals."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from lora_cli.inference.loading import load_run
from lora_cli.tasks import seq_cls
from lora_cli.tasks.data.images import load_image
from lora_cli.tasks.image_classification import class_probabilities
from tests.serve.runs import bomb_png, png_bytes

KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def client(backend):
    from starlette.testclient import TestClient

    from lora_cli.serve.app import Settings, build_app

    app = build_app(backend, Settings(max_batch=8, max_wait_ms=5, max_body_bytes=256 * 1024, max_tokens=40))
    with TestClient(app) as test_client:
        yield test_client


def error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code, body
    assert body["message"]
    return body


def test_models_describe_every_run(client):
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(data) == {"img-a", "img-b", "img-c", "img-loha", "img-loha2", "cls-a", "cls-b", "lm-a", "lm-b"}
    a = data["img-a"]
    assert a["object"] == "model" and a["owned_by"] == "loracli"
    assert a["loracli"]["method"] == "lora" and a["loracli"]["task"] == "image-classification"
    assert a["loracli"]["labels"] == ["beignets", "churros", "macarons"]
    assert a["loracli"]["shares_base_with"] == ["img-b"] and a["loracli"]["mixed_batches"] is True
    assert data["img-loha"]["loracli"]["mixed_batches"] is False
    assert data["lm-a"]["loracli"]["context_length"] == 256


def test_model_card_and_its_plots(client):
    card = client.get("/v1/models/img-a").json()["card"]
    assert card["plots"] == ["/v1/models/img-a/plots/loss.png"]
    png = client.get(card["plots"][0])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert client.get("/v1/models/img-a/plots/..%2Frecipe.yaml").status_code == 404
    error(client.get("/v1/models/img-a/plots/recipe.yaml"), 404, "plot_not_found")
    error(client.get("/v1/models/img-b/plots/loss.png"), 404, "plot_not_found")
    error(client.get("/v1/models/nope"), 404, "model_not_found")


@pytest.mark.parametrize("how", ["multipart", "base64", "data-url"])
def test_image_probabilities_equal_predicts(client, serve_runs, how):
    data = png_bytes(3)
    for name in ("img-a", "img-loha"):
        if how == "multipart":
            response = client.post("/v1/classify", data={"model": name, "top_k": "3"},
                                   files={"image": ("cake.png", data, "image/png")})
        else:
            encoded = base64.b64encode(data).decode()
            image = encoded if how == "base64" else f"data:image/png;base64,{encoded}"
            response = client.post("/v1/classify", json={"model": name, "image": image, "top_k": 3})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["object"] == "classification" and answer["model"] == name
        loaded = load_run(serve_runs[name])
        expected = class_probabilities(loaded.model, loaded.processor, [load_image(data)])[0]
        got = {row["label"]: row["probability"] for row in answer["top_k"]}
        assert [r["probability"] for r in answer["top_k"]] == sorted(got.values(), reverse=True)
        for index, label in loaded.id2label.items():
            assert got[label] == pytest.approx(float(expected[index]), abs=1e-5)


def test_text_probabilities_equal_predicts(client, serve_runs):
    text = "the meal was very lovely"
    answer = client.post("/v1/classify", json={"model": "cls-b", "text": text, "top_k": 1}).json()
    loaded = load_run(serve_runs["cls-b"])
    probs = seq_cls.class_probabilities(loaded.model, loaded.processor, [text])[0]
    best = int(probs.argmax())
    assert answer["top_k"] == [{"label": loaded.id2label[best], "probability": pytest.approx(float(probs[best]), abs=1e-5)}]


def test_completion_equals_predict_prompt(client, serve_runs):
    answer = client.post("/v1/completions", json={"model": "lm-b", "prompt": "the song was", "max_tokens": 7,
                                                  "temperature": 0}).json()
    loaded = load_run(serve_runs["lm-b"])
    choice = answer["choices"][0]
    assert choice["text"] == loaded.task.generate(loaded, "the song was", max_new_tokens=7)
    assert answer["object"] == "text_completion" and choice["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["prompt_tokens"] == 3 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def sse(response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streamed_completion_adds_up_to_the_plain_one(client):
    request = {"model": "lm-a", "prompt": ["the film was", "the book"], "max_tokens": 9, "temperature": 0}
    plain = client.post("/v1/completions", json=request).json()
    chunks = sse(client.post("/v1/completions", json={**request, "stream": True,
                                                      "stream_options": {"include_usage": True}}))
    for index in (0, 1):
        pieces = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert "".join(p["text"] for p in pieces) == plain["choices"][index]["text"]
        assert pieces[-1]["finish_reason"] == plain["choices"][index]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_chat_completion_and_its_stream(client):
    request = {"model": "lm-a", "messages": [{"role": "user", "content": "the day was"}], "max_tokens": 6,
               "temperature": 0, "stop": ["zzz"]}
    plain = client.post("/v1/chat/completions", json=request).json()
    assert plain["object"] == "chat.completion"
    message = plain["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    chunks = sse(client.post("/v1/chat/completions", json={**request, "stream": True}))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]


def test_sampling_with_a_seed_repeats(client):
    request = {"model": "lm-b", "prompt": "the trip was", "max_tokens": 8, "temperature": 1.5, "top_p": 0.9, "seed": 7}
    first = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    assert client.post("/v1/completions", json=request).json()["choices"][0]["text"] == first


@pytest.mark.parametrize(("request_kwargs", "path", "status", "code"), [
    ({"json": {"model": "nope", "text": "x"}}, "/v1/classify", 404, "model_not_found"),
    ({"json": {"model": "img-a", "text": "x"}}, "/v1/classify", 400, "wrong_task"),
    ({"json": {"model": "img-a", "image": "%%%"}}, "/v1/classify", 400, "invalid_base64"),
    ({"json": {"model": "img-a", "image": base64.b64encode(b"not an image").decode()}}, "/v1/classify", 400,
     "invalid_image"),
    ({"json": {"model": "img-a", "image": base64.b64encode(bomb_png()).decode()}}, "/v1/classify", 400,
     "invalid_image"),
    ({"json": {"model": "img-a"}}, "/v1/classify", 400, "missing_input"),
    ({"json": {"model": "img-a", "image": "aGk=", "top_k": 0}}, "/v1/classify", 400, "invalid_field"),
    ({"json": {"model": "img-a", "surprise": 1}}, "/v1/classify", 400, "invalid_field"),
    ({"json": ["not", "an", "object"]}, "/v1/classify", 400, "invalid_body"),
    ({"content": b"{oops", "headers": {"content-type": "application/json"}}, "/v1/classify", 400, "invalid_json"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, "/v1/classify", 415, "unsupported_media_type"),
    ({"data": {"model": "img-a"}, "files": {"image": ("x.png", b"\x89PNG garbage", "image/png")}}, "/v1/classify",
     400, "invalid_image"),
    ({"data": {"model": "img-a", "secret_field": "x"}, "files": {"image": ("x.png", b"x", "image/png")}},
     "/v1/classify", 400, "invalid_field"),
    ({"json": {"model": "cls-a", "text": "good " * 80}}, "/v1/classify", 400, "context_length_exceeded"),
    ({"json": {"model": "lm-a", "prompt": "good " * 250, "max_tokens": 10}}, "/v1/completions", 400,
     "context_length_exceeded"),
    ({"json": {"model": "lm-a", "prompt": "x", "max_tokens": 41}}, "/v1/completions", 400, "max_tokens_too_large"),
    ({"json": {"model": "lm-a", "prompt": "x", "n": 2}}, "/v1/completions", 400, "unsupported_parameter"),
    ({"json": {"model": "lm-a", "prompt": "x", "logprobs": 2}}, "/v1/completions", 400, "unsupported_parameter"),
    ({"json": {"model": "lm-a", "prompt": "x", "temperature": 3}}, "/v1/completions", 400, "invalid_field"),
    ({"json": {"model": "lm-a", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}}, "/v1/completions", 400,
     "invalid_field"),
    ({"json": {"model": "lm-a", "prompt": ""}}, "/v1/completions", 400, "empty_prompt"),
    ({"json": {"model": "cls-a", "prompt": "x"}}, "/v1/completions", 400, "wrong_task"),
    ({"content": b"prompt=x", "headers": {"content-type": "application/x-www-form-urlencoded"}}, "/v1/completions",
     415, "unsupported_media_type"),
    ({"json": {"model": "lm-a", "messages": []}}, "/v1/chat/completions", 400, "invalid_field"),
    ({"json": {"model": "lm-a", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}},
     "/v1/chat/completions", 400, "invalid_field"),
    ({"content": b"x" * (300 * 1024), "headers": {"content-type": "application/json"}}, "/v1/classify", 413,
     "body_too_large"),
])
def test_bad_requests_get_a_4xx_saying_what_was_wrong(client, request_kwargs, path, status, code):
    error(client.post(path, **request_kwargs), status, code)


def test_a_body_streamed_past_the_limit_is_refused(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 8192

    error(client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"}), 413,
          "body_too_large")


def test_unknown_routes_and_methods_answer_json(client):
    error(client.get("/v1/nothing"), 404, "not_found")
    error(client.get("/v1/classify"), 405, "method_not_allowed")


def test_health_metrics_and_the_log_holds_no_user_data(client, caplog):
    secret = "zebra-secret-text"
    with caplog.at_level(logging.INFO, logger="lora_cli.serve"):
        client.post("/v1/classify", json={"model": "cls-a", "text": secret})
        client.post("/v1/classify", json={"model": secret, "text": secret})
        client.post("/v1/completions", json={"model": "lm-a", "prompt": secret, "max_tokens": 2})
        client.post("/v1/classify", data={"model": "img-a"}, files={"image": (f"{secret}.png", png_bytes(1), "image/png")})
        client.get(f"/v1/models/{secret}?q={secret}")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lora_cli.serve")]
    assert len(lines) == 5 and all(secret not in line for line in lines)
    assert "POST classify -> 200" in lines[0] and "bytes in" in lines[0]
    assert client.get("/health").json()["status"] == "ok"
    text = client.get("/metrics").text
    assert 'loracli_requests_total{endpoint="classify",status="200"}' in text
    assert 'loracli_errors_total{kind="model_not_found"}' in text
    assert "loracli_batch_size_bucket" in text and "loracli_request_latency_seconds_bucket" in text
    assert 'loracli_queue_depth{group="base0"}' in text and 'loracli_generated_tokens_total{model="lm-a"}' in text


def test_the_page_loads_everything_from_the_server(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        asset = client.get(f"/page/{name}")
        assert asset.status_code == 200
        assert "http://" not in asset.text and "https://" not in asset.text
    assert "http://" not in page.text and "https://" not in page.text
    assert client.get("/page/..%2F..%2Fapp.py").status_code == 404
    error(client.get("/page/index.css"), 404, "not_found")


def test_api_key_guards_the_api_not_the_page(backend):
    from starlette.testclient import TestClient

    from lora_cli.serve.app import Settings, build_app

    with TestClient(build_app(backend, Settings(api_key=KEY))) as keyed:
        error(keyed.get("/v1/models"), 401, "invalid_api_key")
        error(keyed.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
        error(keyed.get("/metrics"), 401, "invalid_api_key")
        assert keyed.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert keyed.get("/health").status_code == 200 and keyed.get("/").status_code == 200


def test_loopback_server_refuses_foreign_host_headers(backend):
    from starlette.testclient import TestClient

    from lora_cli.serve.app import Settings, build_app

    with TestClient(build_app(backend, Settings(allowed_hosts=["127.0.0.1", "localhost"])),
                    base_url="http://127.0.0.1") as local:
        assert local.get("/health").status_code == 200
        assert local.get("/health", headers={"host": "attacker.example"}).status_code == 400


def test_mixed_requests_at_once_each_get_their_own_answer(client, backend):
    import concurrent.futures

    data = png_bytes(5)
    names = ["img-a", "img-b", "img-loha", "img-loha2", "img-c"] * 3
    expected = {}
    for name in set(names):
        run = backend.runs[name]
        probs = backend.classify([run], [backend.image_input(run, data)])[0]
        expected[name] = run.labels[int(probs.argmax())], float(probs.max())

    def ask(name):
        return name, client.post("/v1/classify", data={"model": name, "top_k": "1"},
                                 files={"image": ("x.png", data, "image/png")}).json()["top_k"][0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for name, top in pool.map(ask, names):
            assert top["label"] == expected[name][0]
            assert top["probability"] == pytest.approx(expected[name][1], abs=1e-5)


def test_chat_uses_the_tokenizers_template_when_it_has_one(client, backend, monkeypatch):
    tokenizer = backend.runs["lm-b"].processor
    template = "{% for m in messages %}{{ m['role'] }} says {{ m['content'] }} {% endfor %}assistant says"
    monkeypatch.setattr(tokenizer, "chat_template", template, raising=False)
    messages = [{"role": "user", "content": "the day was"}]
    expected = tokenizer("user says the day was assistant says")["input_ids"]
    assert backend.chat_ids(backend.runs["lm-b"], messages) == expected
    answer = client.post("/v1/chat/completions", json={"model": "lm-b", "messages": messages, "max_tokens": 3,
                                                       "temperature": 0}).json()
    assert answer["usage"]["prompt_tokens"] == len(expected)


def test_past_the_in_flight_cap_the_api_answers_503(backend):
    from lora_cli.serve.app import Gate, ServerState, Settings

    state = ServerState(backend, Settings(max_in_flight=2))
    gate = Gate(app=None, state=state)
    scope = {"type": "http", "path": "/v1/classify", "headers": [(b"content-length", b"10")]}
    assert gate._refusal(scope) is None
    state.in_flight = 2
    refusal = gate._refusal(scope)
    assert (refusal.status, refusal.code) == (503, "server_busy")
    assert gate._refusal({**scope, "path": "/health"}) is None  # liveness still answers
