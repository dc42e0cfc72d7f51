"""data.packing: packed rows give the loss and the gradients of the same rows unpacked (no attention
across rows), bins are filled best-fit, and a packed recipe trains end to end."""

from __future__ import annotations

import datasets
import pytest
import torch

from lora_cli.errors import UserInputError
from lora_cli.tasks.data import packing
from lora_cli.tasks.data.text_common import pad_batch

PAD = 0


def _rows(seed: int = 0) -> list[dict[str, list[int]]]:
    """Rows of 3 to 9 tokens; the first two mask their first tokens (a prompt), as completion-only data does."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate((5, 3, 9, 4, 7, 6)):
        ids = torch.randint(1, 50, (n,), generator=g).tolist()
        labels = [-100] * 2 + ids[2:] if i < 2 else list(ids)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _model(kind: str, attn: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    else:
        config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=1)
    # eval(): no dropout (GPT-2 has some), so both forwards are deterministic; gradients still flow
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).double().eval()


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_and_gradients_equal_unpacked(kind, attn):
    rows = _rows()
    model = _model(kind, attn)
    unpacked = pad_batch(rows, PAD)
    packed_ds = packing.pack(datasets.Dataset.from_list(rows), max_length=16)
    assert len(packed_ds) == 3  # 34 tokens in rows of at most 16
    packed = packing.collator(PAD)([packed_ds[i] for i in range(len(packed_ds))])
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 3
    assert (packed["labels"] != -100).sum() == (unpacked["labels"][:, 1:] != -100).sum()

    loss, grads = _loss_and_grads(model, unpacked)
    packed_loss, packed_grads = _loss_and_grads(model, packed)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-10, atol=1e-12)
    assert grads.keys() == packed_grads.keys()
    # float64: equal to the last bits with torch's AVX2 and plain kernels; its AVX-512 kernels leave the eager
    # Llama's embedding gradients up to 1.2e-8 apart (of values up to 0.26). Attention leaking across packed
    # rows moves them by orders of magnitude more.
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)

    flat = packing.flattening(packing.collator(PAD))([packed_ds[i] for i in range(len(packed_ds))])
    assert flat["input_ids"].shape == (1, 34)
    flat_loss, _ = _loss_and_grads(model, flat)
    torch.testing.assert_close(flat_loss, loss, rtol=1e-10, atol=1e-12)


def test_packing_without_position_ids_would_mix_rows():
    """The check above can fail: the same packed rows with plain positions give another loss."""
    rows = _rows()
    model = _model("llama", "sdpa")
    packed_ds = packing.pack(datasets.Dataset.from_list(rows), max_length=16)
    packed = packing.collator(PAD)([packed_ds[i] for i in range(len(packed_ds))])
    loss, _ = _loss_and_grads(model, pad_batch(rows, PAD))
    mixed = {k: v for k, v in packed.items() if k != "position_ids"}
    mixed_loss, _ = _loss_and_grads(model, mixed)
    assert abs(float(mixed_loss - loss)) > 1e-4


def test_bins_best_fit_longest_first():
    assert packing.bins([5, 3, 9, 4, 7, 6], 16) == [[2, 4], [5, 0, 3], [1]]
    assert sorted(i for b in packing.bins([8] * 5, 8) for i in b) == list(range(5))
    assert all(sum([3, 11, 2, 7, 5, 1][i] for i in b) <= 12 for b in packing.bins([3, 11, 2, 7, 5, 1], 12))


def test_packed_rows_restart_positions_and_hide_each_first_label():
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    out = packing.pack(datasets.Dataset.from_list(rows), max_length=8)
    assert out[0] == {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]}


def test_models_without_position_ids_are_refused():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(UserInputError, match="BloomForCausalLM takes no position ids.*data.packing: false"):
        packing.require_position_ids(model)


@pytest.mark.slow
def test_packed_recipe_trains_and_dry_run_counts(tmp_path, monkeypatch, capsys):
    from lora_cli.inference.loading import load_run
    from tests.helpers_text import (
        GPT2_CHAT_TEMPLATE,
        TINY_CONFIGS,
        chat_rows,
        cli,
        make_gpt2_tokenizer,
        write_jsonl,
        write_recipe,
    )

    tok = make_gpt2_tokenizer(tmp_path / "tok")
    write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    write_recipe(tmp_path / "recipe.yaml", task="causal-lm", model={"config": TINY_CONFIGS["gpt2"], "tokenizer": str(tok)},
                 data={"train_file": str(tmp_path / "chat.jsonl"), "format": "messages", "chat_template": GPT2_CHAT_TEMPLATE,
                       "max_length": 64, "packing": True})
    code, out, err = cli(monkeypatch, capsys, "train", str(tmp_path / "recipe.yaml"), "--dry-run")
    assert code == 0, err
    text = " ".join((out + err).split())
    assert "36 training rows packed into" in text and "train sequences / 4 eval rows" in text
    code, out, err = cli(monkeypatch, capsys, "train", str(tmp_path / "recipe.yaml"))
    assert code == 0, err
    run = load_run(tmp_path / "run")
    assert run.recipe.data.packing
