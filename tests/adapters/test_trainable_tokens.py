"""Trainable tokens (alone and beside LoRA) against PEFT 0.21: keys, logits both ways,
tied embeddings, merge/unmerge, gradients only on the chosen rows, parameter counts."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lora_cli.adapters import AdapterModel, LoraConfig, get_adapter_model
from lora_cli.adapters.methods.trainable_tokens.config import TrainableTokensConfig
from lora_cli.adapters.methods.trainable_tokens.layer import TrainableTokensLayer
from lora_cli.errors import TargetingError, UserInputError
from tests.helpers import tiny_bert, tiny_t5

peft = pytest.importorskip("peft")

IDS = [3, 5, 7]


def tiny_llama(tie: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 9), generator=g)
    ids[:, :3] = torch.tensor(IDS)  # the chosen tokens appear
    return ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomise(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name or "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _counts(model):
    trainable, total = model.get_nb_trainable_parameters()
    return trainable, total


@pytest.mark.parametrize("tie", [False, True])
def test_alone_matches_peft_both_ways(tie, tmp_path):
    ids = _inputs()
    base_logits = _logits(tiny_llama(tie), ids)
    ours = get_adapter_model(tiny_llama(tie), TrainableTokensConfig(token_indices=IDS, init_weights=False))
    theirs = peft.get_peft_model(tiny_llama(tie), peft.TrainableTokensConfig(token_indices=IDS, init_weights=False))
    assert _counts(ours) == _counts(theirs)  # PEFT: 48 trainable of 5,856 / 4,256 (tied)
    assert _counts(ours)[0] == 3 * 16
    tied = isinstance(ours.base_model.lm_head, TrainableTokensLayer)
    assert tied is tie

    ours.save_pretrained(tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == set(peft.get_peft_model_state_dict(theirs))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TRAINABLE_TOKENS" and saved["target_modules"] == ["model.embed_tokens"]
    assert saved["token_indices"] == IDS
    peft_fields = {f.name for f in dataclasses.fields(peft.TrainableTokensConfig)}
    assert set(saved) <= peft_fields, set(saved) - peft_fields  # nothing PEFT would warn it ignores

    mine = _logits(ours, ids)
    assert (mine - base_logits).abs().max() > 1e-3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(tie), tmp_path / "ours")
    assert not [str(w.message) for w in caught if "ignored" in str(w.message)]
    torch.testing.assert_close(_logits(loaded, ids), mine, atol=1e-6, rtol=0)

    theirs.save_pretrained(tmp_path / "theirs")
    back = AdapterModel.from_pretrained(tiny_llama(tie), tmp_path / "theirs")
    assert isinstance(back.base_model.lm_head, TrainableTokensLayer) is tie
    torch.testing.assert_close(_logits(back, ids), _logits(theirs, ids), atol=1e-6, rtol=0)


def test_alone_merge_unmerge_disable_and_gradients():
    ids = _inputs()
    model = get_adapter_model(tiny_llama(True), TrainableTokensConfig(token_indices=IDS, init_weights=False))
    base = _logits(tiny_llama(True), ids)
    live = _logits(model, ids)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), base, atol=0, rtol=0)
    embed = model.base_model.model.embed_tokens
    before = embed.base_weight().clone()
    model.merge_adapter()
    model.merge_adapter()  # idempotent
    torch.testing.assert_close(_logits(model, ids), live, atol=1e-6, rtol=0)
    changed = (embed.base_weight() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == IDS
    model.unmerge_adapter()
    assert torch.equal(embed.base_weight(), before)

    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    delta = embed.trainable_tokens_delta["default"]
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert embed.base_weight().grad is None and not embed.base_weight().requires_grad

    plain = model.merge_and_unload()
    assert not any(isinstance(m, TrainableTokensLayer) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, ids), live, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_beside_lora_matches_peft_both_ways(tie, tmp_path):
    ids = _inputs()
    kw = {"target_modules": ["q_proj"], "init_lora_weights": False, "trainable_token_indices": IDS}
    ours = get_adapter_model(tiny_llama(tie), LoraConfig(**kw))
    theirs = peft.get_peft_model(tiny_llama(tie), peft.LoraConfig(**kw))
    assert _counts(ours) == _counts(theirs)  # 304 trainable
    _randomise(ours)
    ours.save_pretrained(tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == set(peft.get_peft_model_state_dict(theirs))
    assert any(k.endswith("embed_tokens.token_adapter.trainable_tokens_delta") for k in keys)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["trainable_token_indices"] == IDS and saved["target_modules"] == ["q_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(tie), tmp_path / "ours")
    torch.testing.assert_close(_logits(loaded, ids), _logits(ours, ids), atol=1e-5, rtol=0)

    _randomise(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    back = AdapterModel.from_pretrained(tiny_llama(tie), tmp_path / "theirs")
    torch.testing.assert_close(_logits(back, ids), _logits(theirs, ids), atol=1e-5, rtol=0)
    # merging both the LoRA and the token rows gives the same outputs
    live = _logits(back, ids)
    plain = back.merge_and_unload()
    torch.testing.assert_close(_logits(plain, ids), live, atol=1e-5, rtol=0)


def test_bert_seq_cls_dict_form_matches_peft(tmp_path):
    ids = torch.tensor([[2, 3, 4, 9, 10], [4, 4, 3, 11, 1]])
    kw = {"task_type": "SEQ_CLS", "target_modules": ["query"], "init_lora_weights": False,
          "trainable_token_indices": {"word_embeddings": [3, 4]}, "modules_to_save": ["classifier"]}
    ours = get_adapter_model(tiny_bert(), LoraConfig(**kw))
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(**kw))
    assert _counts(ours) == _counts(theirs)
    _randomise(ours)
    ours.save_pretrained(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        peft.get_peft_model_state_dict(theirs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours")
    torch.testing.assert_close(_logits(loaded, ids), _logits(ours, ids), atol=1e-5, rtol=0)
    # gradients reach only the chosen rows' values, not the embedding matrix
    ours.train()
    ours(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    layer = ours.base_model.bert.embeddings.word_embeddings
    assert layer.trainable_tokens_delta["default"].grad.abs().sum() > 0
    assert not layer.base_weight().requires_grad


def test_errors_name_the_key_and_the_fix():
    with pytest.raises(TargetingError, match=r"trainable_token_indices.*out of range.*vocab size 100"):
        get_adapter_model(tiny_llama(False), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[5, 100]))
    with pytest.raises(TargetingError, match=r"token_indices.*out of range.*vocab size 100"):
        get_adapter_model(tiny_llama(False), TrainableTokensConfig(token_indices=[500]))
    with pytest.raises(UserInputError, match="trainable_token_indices"):
        LoraConfig(target_modules=["q_proj"], trainable_token_indices="3")
    with pytest.raises(UserInputError, match="token_indices"):
        TrainableTokensConfig(token_indices=[])
    with pytest.raises(TargetingError, match="matched no module"):
        get_adapter_model(tiny_llama(False), LoraConfig(target_modules=["q_proj"],
                                                        trainable_token_indices={"wte": [1]}))
    with pytest.raises(TargetingError, match="not both"):
        get_adapter_model(tiny_llama(False), LoraConfig(target_modules=["q_proj", "embed_tokens"],
                                                        trainable_token_indices=[1]))
    from lora_cli.adapters import AdaLoraConfig

    with pytest.raises(UserInputError, match="target_parameters.*not supported by adalora"):
        AdaLoraConfig(target_modules=["q_proj"], total_step=10, target_parameters=["mlp.down_proj.weight"])
    with pytest.raises(UserInputError, match="trainable_token_indices"):  # AdaLoRA takes them, checked the same
        AdaLoraConfig(target_modules=["q_proj"], total_step=10, trainable_token_indices=[1, 1])


def test_mixed_batch_rows_match_single_adapters_and_peft(tmp_path):
    ids = torch.tensor([[1, 2, 3, 4], [1, 3, 2, 5], [1, 1, 2, 3]])
    names = ["default", "b", "__base__"]
    model = get_adapter_model(tiny_llama(False), LoraConfig(target_modules=["q_proj"], init_lora_weights=False,
                                                           trainable_token_indices=[1, 2]))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj"], init_lora_weights=False,
                                      trainable_token_indices=[1, 3]))
    _randomise(model)
    model.eval()
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(_logits(model, ids)[i])
        else:
            model.set_adapter(name)
            rows.append(_logits(model, ids)[i])
    torch.testing.assert_close(mixed, torch.stack(rows), atol=1e-6, rtol=0)

    model.save_pretrained(tmp_path)  # "default" at the root, "b" in a sub-folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(False), tmp_path)
        theirs.load_adapter(tmp_path / "b", "b")
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids, adapter_names=names).logits, mixed, atol=1e-5, rtol=0)


def test_combining_adapters_with_tokens_is_refused_clearly():
    from lora_cli.adapters.combine import CombineError

    model = get_adapter_model(tiny_llama(False), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1]))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3]))
    with pytest.raises(CombineError, match="trainable tokens"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "ab", combination_type="linear")
    assert "ab" not in model.peft_config


def test_beside_adalora_matches_peft_both_ways_and_budgets(tmp_path):
    from lora_cli.adapters import AdaLoraConfig

    ids = _inputs()
    kw = {"target_modules": ["q_proj", "v_proj"], "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1,
          "deltaT": 1, "total_step": 5, "trainable_token_indices": IDS}
    ours = get_adapter_model(tiny_llama(False), AdaLoraConfig(**kw))
    theirs = peft.get_peft_model(tiny_llama(False), peft.AdaLoraConfig(**kw))
    assert _counts(ours) == _counts(theirs)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # AdaLoRA starts with E = 0: give every adapter tensor non-zero values
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ours.save_pretrained(tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == set(peft.get_peft_model_state_dict(theirs))
    assert any(k.endswith("embed_tokens.token_adapter.trainable_tokens_delta") for k in keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(False), tmp_path / "ours")
    mine = _logits(ours, ids)
    assert (mine - _logits(tiny_llama(False), ids)).abs().max() > 1e-3
    torch.testing.assert_close(_logits(loaded, ids), mine, atol=1e-5, rtol=0)

    back = AdapterModel.from_pretrained(tiny_llama(False), tmp_path / "ours", is_trainable=True)
    torch.testing.assert_close(_logits(back, ids), mine, atol=1e-6, rtol=0)
    # the budget runs beside the token rows: they train, the ranks shrink to target_r, the rows stay
    back.train()
    optimizer = torch.optim.SGD([p for p in back.parameters() if p.requires_grad], lr=0.1)
    delta = next(p for n, p in back.named_parameters() if n.endswith("trainable_tokens_delta.default"))
    before = delta.detach().clone()
    for step in range(kw["total_step"] + 1):
        loss = back(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        back.update_and_allocate(step)
        optimizer.zero_grad()
    pattern = back.method_state["default"].rank_pattern
    assert pattern and sum(map(sum, pattern.values())) == 2 * len(pattern)
    assert not torch.equal(delta.detach(), before)
    back.save_pretrained(tmp_path / "trained")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reread = peft.PeftModel.from_pretrained(tiny_llama(False), tmp_path / "trained")
    back.eval()
    torch.testing.assert_close(_logits(reread, ids), _logits(back, ids), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ embeddings tied through other Embedding modules
def tiny_bart(seed: int = 0):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=99, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    return BartForConditionalGeneration(cfg).eval()


SEQ2SEQ = {"t5": (tiny_t5, ["q", "v"]), "bart": (tiny_bart, ["q_proj", "v_proj"])}


def _seq2seq_logits(model):
    ids = torch.tensor([[3, 5, 7, 9, 10, 11], [7, 3, 12, 13, 5, 6]])  # the chosen tokens reach the encoder
    decoder_ids = torch.tensor([[0, 3, 5, 7], [0, 7, 5, 3]])  # ... and the decoder
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=decoder_ids).logits


def _tied_paths(model) -> set[str]:
    return {n for n, m in model.base_model.named_modules() if isinstance(m, TrainableTokensLayer)}


@pytest.mark.parametrize("arch", sorted(SEQ2SEQ))
def test_seq2seq_shared_embedding_alone_matches_peft_both_ways(arch, tmp_path):
    """T5 / BART tie `shared`, the encoder's and the decoder's embed_tokens (separate Embedding modules)
    and the output layer: every one of them gets the trained rows, as in PEFT."""
    build, _ = SEQ2SEQ[arch]
    base = _seq2seq_logits(build())
    ours = get_adapter_model(build(), TrainableTokensConfig(token_indices=IDS, init_weights=False))
    theirs = peft.get_peft_model(build(), peft.TrainableTokensConfig(token_indices=IDS, init_weights=False))
    assert _counts(ours) == _counts(theirs)
    wrapped = _tied_paths(ours)
    assert {p.rsplit(".", 1)[-1] for p in wrapped} == {"shared", "embed_tokens", "lm_head"} and len(wrapped) == 4
    mine = _seq2seq_logits(ours)
    assert (mine - base).abs().max() > 1e-2  # non-zero trained rows

    ours.save_pretrained(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        peft.get_peft_model_state_dict(theirs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    torch.testing.assert_close(_seq2seq_logits(loaded), mine, atol=1e-5, rtol=0)

    theirs.save_pretrained(tmp_path / "theirs")  # PEFT's TrainableTokensConfig file
    back = AdapterModel.from_pretrained(build(), tmp_path / "theirs")
    torch.testing.assert_close(_seq2seq_logits(back), _seq2seq_logits(theirs), atol=1e-5, rtol=0)
    live = _seq2seq_logits(back)
    plain = back.merge_and_unload()
    torch.testing.assert_close(_seq2seq_logits(plain), live, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", sorted(SEQ2SEQ))
def test_seq2seq_shared_embedding_beside_lora_matches_peft_both_ways(arch, tmp_path):
    build, targets = SEQ2SEQ[arch]
    kw = {"target_modules": targets, "init_lora_weights": False, "trainable_token_indices": IDS}
    base = _seq2seq_logits(build())
    ours = get_adapter_model(build(), LoraConfig(**kw))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**kw))
    assert _counts(ours) == _counts(theirs)
    assert len(_tied_paths(ours)) == 4
    _randomise(ours)
    ours.save_pretrained(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        peft.get_peft_model_state_dict(theirs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    torch.testing.assert_close(_seq2seq_logits(loaded), _seq2seq_logits(ours), atol=1e-5, rtol=0)

    _randomise(theirs)  # non-zero rows: PEFT's file must move the logits through every tied module
    theirs.save_pretrained(tmp_path / "theirs")
    back = AdapterModel.from_pretrained(build(), tmp_path / "theirs")
    expected = _seq2seq_logits(theirs)
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(_seq2seq_logits(back), expected, atol=1e-5, rtol=0)
    back.merge_adapter()
    torch.testing.assert_close(_seq2seq_logits(back), expected, atol=1e-5, rtol=0)
    back.unmerge_adapter()
    with back.disable_adapter():
        torch.testing.assert_close(_seq2seq_logits(back), base, atol=1e-5, rtol=0)  # LoRA merge rounding
