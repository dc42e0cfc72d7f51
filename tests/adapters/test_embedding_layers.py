"""Base embedding weights carried in an adapter file (PEFT's ``save_embedding_layers``), both ways.

PEFT writes the input / output embedding's base weight beside the adapter when the embedding
is targeted (``...embed_tokens.base_layer.weight``, its default "auto") or when the vocabulary
was resized since the base checkpoint (``...embed_tokens.weight``, ``lm_head.weight``): the
rows a resize added are random, and only the file can bring them back. Each test resizes two
bases with different seeds, so the new rows differ unless the file's weights are loaded.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from lora_cli.adapters import AdapterModel, LoraConfig, get_adapter_model
from lora_cli.errors import AdapterStateError

peft = pytest.importorskip("peft")

VOCAB = 104  # the tiny base has 100 rows: 4 added tokens
NEW = [100, 102, 103]


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """The tiny Llama checkpoints (untied and tied) as folders, so base_model_name_or_path names them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bases")
    for tie in (False, True):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
        LlamaForCausalLM(cfg).save_pretrained(root / f"tie{tie}")
    return root


def _base(base_dirs, tie: bool, seed: int, resize: bool = True):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dirs / f"tie{tie}")
    if resize:
        torch.manual_seed(seed)  # the added rows are random: each seed gives other rows
        model.resize_token_embeddings(VOCAB, mean_resizing=False)
    return model.eval()


def _ids():
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    ids[:, :3] = torch.tensor(NEW)
    return ids


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _perturb(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


CASES = {  # name: (tied, LoRA settings, the non-adapter keys PEFT's "auto" writes)
    "embed_tokens targeted": (False, {"target_modules": ["embed_tokens", "q_proj"]},
                              {"model.embed_tokens.base_layer.weight"}),
    "lm_head targeted": (False, {"target_modules": ["lm_head", "q_proj"]}, {"lm_head.base_layer.weight"}),
    "regex target, tied": (True, {"target_modules": r".*(embed_tokens|q_proj)"},
                           {"model.embed_tokens.base_layer.weight"}),
    "resized, not targeted": (False, {"target_modules": ["q_proj"]},
                              {"model.embed_tokens.weight", "lm_head.weight"}),
    "resized, tokens beside LoRA": (False, {"target_modules": ["q_proj"], "trainable_token_indices": NEW},
                                    {"model.embed_tokens.token_adapter.base_layer.weight", "lm_head.weight"}),
    "resized, tokens beside LoRA, tied": (True, {"target_modules": ["q_proj"], "trainable_token_indices": NEW},
                                          {"model.embed_tokens.token_adapter.base_layer.weight",
                                           "lm_head.token_adapter.base_layer.weight"}),
}


def _extra_keys(path) -> set[str]:
    keys = load_file(path / "adapter_model.safetensors")
    return {k.removeprefix("base_model.model.") for k in keys
            if "lora_" not in k and "trainable_tokens_delta" not in k}


def _peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, path)


# Untied, with one of the two embeddings targeted, PEFT's file carries only that one: the other's
# added rows stay the base's own, in PEFT as here. Every other case carries every added row.
PARTIAL = {"embed_tokens targeted", "lm_head targeted"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_files_carrying_embedding_weights_load_with_equal_logits(case, base_dirs, tmp_path):
    tie, kw, extra = CASES[case]
    theirs = peft.get_peft_model(_base(base_dirs, tie, seed=1), peft.LoraConfig(init_lora_weights=False, **kw))
    _perturb(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)  # save_embedding_layers="auto", PEFT's default
    assert _extra_keys(tmp_path) == extra
    carried = load_file(tmp_path / "adapter_model.safetensors")

    other = _base(base_dirs, tie, seed=2)  # other random rows for the added tokens
    assert (_logits(other) - _logits(_base(base_dirs, tie, seed=1))).abs().max() > 1e-2
    back = AdapterModel.from_pretrained(other, tmp_path)
    back.merge_adapter()
    back.unmerge_adapter()  # restores the carried rows (trainable tokens keep the originals they replace)
    for key in extra:  # the base weights the file carries are the model's now
        live = dict(back.base_model.named_parameters(remove_duplicate=False))[key.replace("token_adapter.", "")]
        torch.testing.assert_close(live, carried["base_model.model." + key], atol=1e-6, rtol=0)
    expected = _logits(theirs) if case not in PARTIAL else _logits(_peft_load(_base(base_dirs, tie, seed=2), tmp_path))
    torch.testing.assert_close(_logits(back), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_loracli_writes_embedding_weights_where_peft_does_and_peft_loads_them(case, base_dirs, tmp_path):
    tie, kw, extra = CASES[case]
    ours = get_adapter_model(_base(base_dirs, tie, seed=1), LoraConfig(init_lora_weights=False, **kw))
    _perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    assert _extra_keys(tmp_path / "ours") == extra  # the same keys as PEFT's "auto"
    loaded = _peft_load(_base(base_dirs, tie, seed=2), tmp_path / "ours")
    again = AdapterModel.from_pretrained(_base(base_dirs, tie, seed=2), tmp_path / "ours")
    torch.testing.assert_close(_logits(again), _logits(loaded), atol=1e-5, rtol=0)
    if case not in PARTIAL:
        torch.testing.assert_close(_logits(loaded), _logits(ours), atol=1e-5, rtol=0)
        torch.testing.assert_close(_logits(again), _logits(ours), atol=1e-6, rtol=0)


def test_save_embedding_layers_true_false_and_auto_without_a_resize(base_dirs, tmp_path):
    kw = {"target_modules": ["q_proj"], "init_lora_weights": False}
    ours = get_adapter_model(_base(base_dirs, False, seed=0, resize=False), LoraConfig(**kw))
    ours.save_pretrained(tmp_path / "auto")  # nothing targeted, nothing resized: the adapter alone
    assert _extra_keys(tmp_path / "auto") == set()
    ours.save_pretrained(tmp_path / "true", save_embedding_layers=True)
    theirs = peft.get_peft_model(_base(base_dirs, False, seed=0, resize=False), peft.LoraConfig(**kw))
    expected = {k.removeprefix("base_model.model.") for k in peft.get_peft_model_state_dict(
        theirs, save_embedding_layers=True) if "lora_" not in k}
    assert _extra_keys(tmp_path / "true") == expected == {"model.embed_tokens.weight", "lm_head.weight"}

    targeted = get_adapter_model(_base(base_dirs, False, seed=1), LoraConfig(
        target_modules=["embed_tokens", "q_proj"], init_lora_weights=False))
    targeted.save_pretrained(tmp_path / "false", save_embedding_layers=False)
    assert _extra_keys(tmp_path / "false") == set()
    with pytest.raises(ValueError, match="save_embedding_layers"):
        targeted.save_pretrained(tmp_path / "bad", save_embedding_layers="yes")


def test_embedding_weights_for_another_vocabulary_are_refused_with_the_fix(base_dirs, tmp_path):
    theirs = peft.get_peft_model(_base(base_dirs, False, seed=1), peft.LoraConfig(
        target_modules=["embed_tokens", "q_proj"], init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    with pytest.raises(AdapterStateError, match=r"embed_tokens.*104.*100.*resize_token_embeddings\(104\)"):
        AdapterModel.from_pretrained(_base(base_dirs, False, seed=0, resize=False), tmp_path)
