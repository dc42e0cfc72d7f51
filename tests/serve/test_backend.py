"""The backend: which runs share a model, mixed-adapter forwards equal to `predict`, batched
generation equal to `predict --prompt`."""

from __future__ import annotations

import pytest
import torch

from lora_cli.inference.loading import load_run
from lora_cli.serve.backend import base_key
from lora_cli.serve.streams import Row
from lora_cli.tasks import seq_cls
from lora_cli.tasks.data.images import load_image
from lora_cli.tasks.image_classification import class_probabilities
from tests.serve.runs import png_bytes


def test_runs_share_a_model_only_when_the_base_and_method_are_the_same(backend, serve_runs):
    group = {name: run.group.name for name, run in backend.runs.items()}
    assert group["img-a"] == group["img-b"]
    assert group["img-c"] != group["img-a"]  # another random base
    assert group["img-loha"] == group["img-loha2"] != group["img-a"]  # same weights, other method
    assert group["cls-a"] == group["cls-b"] and group["lm-a"] == group["lm-b"]
    assert len(backend.groups) == 5
    assert base_key(serve_runs["img-a"]) == base_key(serve_runs["img-b"]) != base_key(serve_runs["img-c"])


def test_mixable_follows_the_engine(backend):
    mixed = {name: run.mixable for name, run in backend.runs.items()}
    assert mixed == {"img-a": True, "img-b": True, "img-c": False, "img-loha": False, "img-loha2": False,
                     "cls-a": True, "cls-b": True, "lm-a": True, "lm-b": True}
    a, loha, loha2 = backend.runs["img-a"], backend.runs["img-loha"], backend.runs["img-loha2"]
    x = torch.zeros(3, 32, 32)
    assert a.batch_key(x) == backend.runs["img-b"].batch_key(x)
    assert loha.batch_key(x) != loha2.batch_key(x)


def test_a_mixed_image_batch_gives_each_row_its_runs_predict_probabilities(backend, serve_runs):
    names = ["img-a", "img-b", "img-a", "img-b"]
    images = [png_bytes(seed) for seed in range(4)]
    rows = [backend.image_input(backend.runs[n], data) for n, data in zip(names, images)]
    served = backend.classify([backend.runs[n] for n in names], rows)
    for name, data, probs in zip(names, images, served):
        loaded = load_run(serve_runs[name])
        expected = class_probabilities(loaded.model, loaded.processor, [load_image(data)])[0]
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(served[0], served[1], atol=1e-3)  # the adapters really differ


@pytest.mark.parametrize("name", ["img-loha", "img-loha2", "img-c"])
def test_runs_that_cannot_mix_get_their_own_forward_and_predict_probabilities(backend, serve_runs, name):
    data = png_bytes(11)
    run = backend.runs[name]
    served = backend.classify([run], [backend.image_input(run, data)])[0]
    loaded = load_run(serve_runs[name])
    expected = class_probabilities(loaded.model, loaded.processor, [load_image(data)])[0]
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)


def test_a_mixed_text_batch_pads_and_matches_predict(backend, serve_runs):
    texts = [("cls-a", "the film was good"), ("cls-b", "the day was very very bad"), ("cls-a", "grim")]
    rows = [backend.text_input(backend.runs[n], t) for n, t in texts]
    served = backend.classify([backend.runs[n] for n, _ in texts], rows)
    for (name, text), probs in zip(texts, served):
        loaded = load_run(serve_runs[name])
        torch.testing.assert_close(probs, seq_cls.class_probabilities(loaded.model, loaded.processor, [text])[0],
                                   atol=1e-5, rtol=0)


def test_batched_generation_of_two_adapters_equals_predict_row_by_row(backend, serve_runs):
    prompts = [("lm-a", "the film was"), ("lm-b", "the film was"), ("lm-a", "the book")]  # lengths differ: left padding
    rows = [Row(prompt_ids=backend.prompt_ids(backend.runs[n], p), max_tokens=8, temperature=0,
                decode=lambda ids, n=n: backend.decode(backend.runs[n], ids), eos_ids=backend.eos_ids(backend.runs[n]))
            for n, p in prompts]
    backend.generate([backend.runs[n] for n, _ in prompts], rows)
    for (name, prompt), row in zip(prompts, rows):
        loaded = load_run(serve_runs[name])
        assert row.text == loaded.task.generate(loaded, prompt, max_new_tokens=8)
        assert row.finish_reason in ("stop", "length")
    assert rows[0].text != rows[1].text  # one prompt, two adapters: two answers
