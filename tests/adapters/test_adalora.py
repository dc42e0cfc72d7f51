"""AdaLoRA against PEFT: parameter count, config errors, file interop both ways (before and
after pruning, with rank-0 modules), identical rank allocation over a training loop, and
the orthogonality penalty in the training loss."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lora_cli.adapters import AdapterModel, get_adapter_model
from lora_cli.adapters.methods.adalora.config import AdaLoraConfig
from lora_cli.errors import AdapterConfigError, LoraCliError
from tests.helpers import tiny_bert, tiny_gpt2

ATOL = 1e-5
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=7)
BERT_TARGETS = ["query", "value"]


def _no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    return model


def _batch(n: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(2, 99, (n, 12), generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def _peft(base: nn.Module, **kw) -> peft.PeftModel:
    return peft.get_peft_model(base, peft.AdaLoraConfig(**(SCHEDULE | {"target_modules": BERT_TARGETS} | kw)))


def _ours(base: nn.Module, **kw) -> AdapterModel:
    return get_adapter_model(base, AdaLoraConfig(**(SCHEDULE | {"target_modules": BERT_TARGETS} | kw)))


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"]).logits


def _peft_pattern(model: peft.PeftModel) -> dict[str, list[bool]]:
    pattern = model.peft_config["default"].rank_pattern
    return {k.replace(".default", ""): v for k, v in pattern.items()}


def _train(model: nn.Module, allocate, steps: int, seed: int = 0) -> None:
    """SGD steps on fixed data, allocating ranks between backward and zero_grad."""
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        model(**_batch(seed=step)).loss.backward()
        optimizer.step()
        allocate(step)
        optimizer.zero_grad()


# ---------------------------------------------------------------------- config


def test_trainable_parameters_of_vit_base_match_the_food101_guide():
    from transformers import ViTConfig, ViTForImageClassification

    base = ViTForImageClassification(ViTConfig(num_labels=101))
    fresh = sum(p.numel() for p in base.parameters())
    config = AdaLoraConfig(r=8, init_r=12, tinit=200, tfinal=1000, deltaT=10, total_step=5000,
                           target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_adapter_model(base, config)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 520_325
    per_module = 12 * 768 + 12 + 768 * 12 + 1  # A, E, B, frozen ranknum
    assert total == fresh + 24 * per_module + (768 * 101 + 101)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"total_step: is required"),
        ({"total_step": 0}, r"total_step: must be an integer > 0"),
        ({"total_step": 100, "tinit": 60, "tfinal": 40},
         r"tinit \(60\) >= total_step \(100\) - tfinal \(40\).*lower tinit or tfinal, or raise total_step"),
        ({"total_step": 100, "use_dora": True}, r"use_dora: is not supported by AdaLoRA"),
        ({"total_step": 100, "beta1": 1.0}, r"beta1: must be a number in \(0, 1\)"),
        ({"total_step": 100, "orth_reg_weight": -1}, r"orth_reg_weight: must be a number >= 0"),
        ({"total_step": 100, "rank_pattern": {"q.lora_E": 3}}, r"rank_pattern\['q.lora_E'\]: must be a list"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(kwargs, match):
    with pytest.raises(AdapterConfigError, match=match):
        AdaLoraConfig(**kwargs)


def test_config_defaults_and_json_match_peft(tmp_path):
    config = AdaLoraConfig(total_step=10, target_modules=BERT_TARGETS)
    assert (config.target_r, config.init_r, config.deltaT, config.beta1, config.orth_reg_weight) == (8, 12, 1, 0.85, 0.5)
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "ADALORA" and data["rank_pattern"] is None
    assert peft.PeftConfig.from_pretrained(tmp_path).total_step == 10


def test_update_and_allocate_without_gradients_says_when_to_call_it():
    model = _ours(tiny_bert())
    with pytest.raises(LoraCliError, match="after loss.backward"):
        model.update_and_allocate(0)


# --------------------------------------------------------------------- interop


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merge_and_unmerge_keep_the_logits(arch):
    """(The files move both ways with PEFT: test_interop_table.py.)"""
    build, targets = (tiny_bert, BERT_TARGETS) if arch == "bert" else (tiny_gpt2, ["c_attn"])
    model = _ours(build(), init_lora_weights=False, target_modules=targets)
    batch = _batch()
    ours = _logits(model, batch)
    assert not torch.allclose(ours, _logits(build(), batch), atol=1e-3)  # the adapter does something
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, batch), ours, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model, batch), ours, atol=ATOL, rtol=0)


def _pattern_with_empty_module(paths: list[str], r: int) -> dict[str, list[bool]]:
    """First module pruned to rank 0, the others keep every other rank."""
    pattern = {f"{p}.lora_E": [i % 2 == 0 for i in range(r)] for p in paths}
    pattern[f"{paths[0]}.lora_E"] = [False] * r
    return pattern


def test_pruned_ours_loads_in_peft_and_back(tmp_path):
    model = _ours(tiny_bert(), init_lora_weights=False)
    hooks = model.method_state["default"]
    pattern = _pattern_with_empty_module(model.targets["default"], 4)
    hooks.rank_pattern = pattern
    hooks.apply_mask(pattern)
    batch = _batch()
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert saved == pattern
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    first = f"base_model.model.{model.targets['default'][0]}"
    assert tensors[f"{first}.lora_A"].shape == (0, 32) and tensors[f"{first}.lora_B"].shape == (32, 0)
    assert all(t.shape[0] == 2 for k, t in tensors.items() if k.endswith("lora_E") and not k.startswith(first))
    assert not any("ranknum" in k for k in tensors)

    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(_logits(theirs, batch), expected, atol=ATOL, rtol=0)
    again = AdapterModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(_logits(again, batch), expected, atol=ATOL, rtol=0)
    layer = again.base_model.get_submodule(model.targets["default"][1])
    assert layer.r["default"] == 2 and layer.ranknum["default"].item() == 4  # scale kept from init_r

    again.save_pretrained(tmp_path / "resaved")  # already sliced: saved as is
    assert load_file(tmp_path / "resaved" / "adapter_model.safetensors").keys() == tensors.keys()
    torch.testing.assert_close(_logits(AdapterModel.from_pretrained(tiny_bert(), tmp_path / "resaved"), batch),
                               expected, atol=ATOL, rtol=0)


def test_pruned_peft_loads_in_ours(tmp_path):
    model = _peft(tiny_bert(), init_lora_weights=False)
    paths = sorted({n.split(".lora_E")[0] for n, _ in model.base_model.model.named_parameters() if ".lora_E." in n})
    pattern = _pattern_with_empty_module(paths, 4)
    model.peft_config["default"].rank_pattern = pattern
    model.base_model.rankallocator.mask_using_rank_pattern(model.base_model.model, pattern)
    batch = _batch()
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    ours = AdapterModel.from_pretrained(tiny_bert(), tmp_path)
    assert ours.base_model.get_submodule(paths[0]).r["default"] == 0
    torch.testing.assert_close(_logits(ours, batch), expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------ allocation


def test_rank_allocation_matches_peft_step_for_step(tmp_path):
    peft_model = _peft(_no_dropout(tiny_bert(seed=3)), init_lora_weights=False)
    peft_model.save_pretrained(tmp_path / "start")
    ours = AdapterModel.from_pretrained(_no_dropout(tiny_bert(seed=3)), tmp_path / "start", is_trainable=True)

    peft_patterns, our_patterns = [], []

    def peft_step(step):
        peft_model.base_model.update_and_allocate(step)
        pattern = peft_model.peft_config["default"].rank_pattern
        peft_patterns.append(_peft_pattern(peft_model) if pattern else None)

    def our_step(step):
        ours.update_and_allocate(step)
        our_patterns.append(ours.method_state["default"].rank_pattern)

    steps = SCHEDULE["total_step"] + 1  # budgeting, the final mask, one step past it
    _train(peft_model.base_model, peft_step, steps)  # AdaLoraModel.forward adds the penalty
    _train(ours, our_step, steps)

    assert our_patterns == peft_patterns
    final = our_patterns[-1]
    assert sum(map(sum, final.values())) == SCHEDULE["target_r"] * len(final) == 8
    assert ours.peft_config["default"].rank_pattern == final
    assert len({tuple(mask) for mask in final.values()}) > 1  # scores, not positions, chose the ranks
    budgeting = our_patterns[SCHEDULE["tinit"] + 1]  # the first mask, on a larger budget
    assert 8 < sum(map(sum, budgeting.values())) < 16
    batch = _batch(seed=99)
    torch.testing.assert_close(_logits(ours, batch), _logits(peft_model, batch), atol=ATOL, rtol=0)

    ours.save_pretrained(tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "peft")
    read = lambda d: json.loads((tmp_path / d / "adapter_config.json").read_text())["rank_pattern"]  # noqa: E731
    assert read("ours") == read("peft") == final


# ---------------------------------------------------------------- regulariser


def test_training_loss_adds_the_orthogonality_penalty_like_peft():
    peft_model = _peft(_no_dropout(tiny_bert()), init_lora_weights=False, orth_reg_weight=0.3)
    ours = _ours(_no_dropout(tiny_bert()), init_lora_weights=False, orth_reg_weight=0.3)
    ours.load_adapter_state_dict(peft.get_peft_model_state_dict(peft_model))
    batch = _batch()

    task = ours.eval()(**batch).loss
    loss = ours.train()(**batch).loss
    terms = []
    for _, layer in ours.adapter_layers():
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        terms += [torch.linalg.norm(a @ a.T - torch.eye(4)), torch.linalg.norm(b.T @ b - torch.eye(4))]
    penalty = torch.stack(terms).mean()
    assert penalty > 1
    torch.testing.assert_close(loss, task + 0.3 * penalty, atol=1e-5, rtol=0)
    # PeftModel without a task type skips AdaLoraModel.forward, which adds the penalty
    torch.testing.assert_close(loss, peft_model.base_model.train()(**batch).loss, atol=1e-5, rtol=0)
    loss.backward()
    assert all(p.grad is not None for p in ours.adapter_parameters())


