"""LoRA on nn.Parameter (target_parameters) against PEFT 0.21's ParamWrapper, on a tiny
transformers 5 Mixtral whose experts are 3-D parameters (gate_up_proj (E, 2I, H), down_proj (E, H, I))."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lora_cli.adapters import AdapterModel, LoraConfig, get_adapter_model
from lora_cli.adapters.methods.lora.param import ParamLoraLayer
from lora_cli.errors import TargetingError, UserInputError

peft = pytest.importorskip("peft")

PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
EXPERTS = 4


def tiny_mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=EXPERTS,
                        num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval()


def _ids():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits




@pytest.mark.parametrize("rank_pattern", [{}, {"experts.gate_up_proj": 1, "experts.down_proj": 1}])
def test_matches_peft_both_ways(rank_pattern, tmp_path):
    ids = _ids()
    kw = {"r": 2, "target_modules": ["q_proj"], "target_parameters": PARAMS, "init_lora_weights": False,
          "rank_pattern": rank_pattern}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = get_adapter_model(tiny_mixtral(), LoraConfig(**kw))
        theirs = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(**kw))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    experts = ours.base_model.model.layers[0].mlp.experts
    assert isinstance(experts, ParamLoraLayer) and experts.parameter_name == "down_proj"
    assert isinstance(experts.base_layer, ParamLoraLayer) and experts.base_layer.parameter_name == "gate_up_proj"

    base = _logits(tiny_mixtral(), ids)
    mine = _logits(ours, ids)
    assert (mine - base).abs().max() > 1e-3
    ours.save_pretrained(tmp_path / "ours")
    state = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_state = peft.get_peft_model_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in theirs_state.items()}
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(PARAMS) and saved["target_modules"] == ["q_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_mixtral(), tmp_path / "ours")
    torch.testing.assert_close(_logits(loaded, ids), mine, atol=1e-5, rtol=0)

    theirs.save_pretrained(tmp_path / "theirs")
    back = AdapterModel.from_pretrained(tiny_mixtral(), tmp_path / "theirs")
    peft_logits = _logits(theirs, ids)
    assert (peft_logits - base).abs().max() > 1e-3
    torch.testing.assert_close(_logits(back, ids), peft_logits, atol=1e-5, rtol=0)
    # merged in PEFT == merged here
    torch.testing.assert_close(_logits(back.merge_and_unload(), ids),
                               _logits(theirs.merge_and_unload(), ids), atol=1e-5, rtol=0)


def test_merge_unmerge_disable_gradients():
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_adapter_model(tiny_mixtral(), LoraConfig(r=2, target_modules=[], target_parameters=PARAMS,
                                                             init_lora_weights=False))
    base = _logits(tiny_mixtral(), ids)
    live = _logits(model, ids)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), base, atol=0, rtol=0)
    layers = [layer for _, layer in model.adapter_layers()]
    assert len(layers) == 4  # two parameters x two blocks, nothing from target_modules=[]
    before = [layer.base_weight().clone() for layer in layers]
    model.merge_adapter()
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, ids), live, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    for layer, weight in zip(layers, before, strict=True):
        torch.testing.assert_close(layer.base_weight(), weight, atol=1e-6, rtol=0)

    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not any(layer.base_weight().requires_grad for layer in layers)


def test_per_expert_rank_guidance_warns():
    with pytest.warns(UserWarning, match=r"max\(1, r // num_experts\) = 2.*rank_pattern"):
        get_adapter_model(tiny_mixtral(), LoraConfig(r=8, target_modules=["q_proj"], target_parameters=PARAMS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_adapter_model(tiny_mixtral(), LoraConfig(r=8, target_modules=["q_proj"], target_parameters=PARAMS,
                                                     rank_pattern={"experts.gate_up_proj": 2,
                                                                   "experts.down_proj": 2}))


def test_errors():
    with pytest.raises(UserInputError, match="lora_dropout.*target_parameters"):
        LoraConfig(target_modules=["q_proj"], target_parameters=PARAMS, lora_dropout=0.1)
    with pytest.raises(UserInputError, match="use_dora.*target_parameters"):
        LoraConfig(target_modules=["q_proj"], target_parameters=PARAMS, use_dora=True)
    with pytest.raises(UserInputError, match="target_parameters.*list of parameter names"):
        LoraConfig(target_modules=["q_proj"], target_parameters="experts.*")
    with pytest.raises(TargetingError, match="matched no parameter.*gate_up_proj"):
        get_adapter_model(tiny_mixtral(), LoraConfig(target_modules=["q_proj"], target_parameters=["experts.w9"]))


def test_second_adapter_reuses_the_wrappers_and_must_target_the_same_parameters(tmp_path):
    from lora_cli.adapters.combine import CombineError

    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_adapter_model(tiny_mixtral(), LoraConfig(r=1, target_modules=["q_proj"],
                                                             target_parameters=PARAMS, init_lora_weights=False))
        model.add_adapter("b", LoraConfig(r=1, target_modules=["q_proj"], target_parameters=PARAMS,
                                          init_lora_weights=False))
        with pytest.raises(TargetingError, match="must all target the same parameters"):
            model.add_adapter("c", LoraConfig(r=1, target_modules=["q_proj"], target_parameters=PARAMS[:1]))
    wrappers = [layer for _, layer in model.adapter_layers() if isinstance(layer, ParamLoraLayer)]
    assert len(wrappers) == 4 and all(set(w.r) == {"default", "b"} for w in wrappers)  # no extra nesting
    first = _logits(model, ids)
    model.set_adapter("b")
    assert (_logits(model, ids) - first).abs().max() > 1e-4
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_mixtral(), tmp_path / "b")
    torch.testing.assert_close(_logits(theirs, ids), _logits(model, ids), atol=1e-5, rtol=0)
    with pytest.raises(CombineError, match="target_parameters"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "ab", combination_type="linear")


def test_target_parameters_without_target_modules_adapt_the_parameters_as_peft(tmp_path):
    """No target_modules: only the parameters are adapted, as PEFT does on this model (its LoRA has
    no default target modules for Mixtral's experts); the file says target_modules: [] so PEFT,
    which fills in default target modules for a null on some model types, loads it as trained."""
    ids = _ids()
    kw = {"r": 2, "target_parameters": PARAMS, "init_lora_weights": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = get_adapter_model(tiny_mixtral(), LoraConfig(**kw))
        theirs = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(**kw))
    adapted = {n: m.parameter_name for n, m in ours.base_model.named_modules() if isinstance(m, ParamLoraLayer)}
    assert sorted(adapted.values()) == ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj"]
    assert all(".mlp.experts" in n for n in adapted)  # and nothing else: no default targets added
    assert ours.targets["default"] == []
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    mine = _logits(ours, ids)
    assert (mine - _logits(tiny_mixtral(), ids)).abs().max() > 1e-3

    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["target_modules"] == [] and saved["target_parameters"] == PARAMS
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(peft.get_peft_model_state_dict(theirs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_mixtral(), tmp_path / "ours")
    torch.testing.assert_close(_logits(loaded, ids), mine, atol=1e-5, rtol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
    back = AdapterModel.from_pretrained(tiny_mixtral(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(back, ids), _logits(theirs, ids), atol=1e-5, rtol=0)

    with pytest.raises(TargetingError, match="target_modules is not set"):  # neither: still refused
        get_adapter_model(tiny_mixtral(), LoraConfig(r=2))
