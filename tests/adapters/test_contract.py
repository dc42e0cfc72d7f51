"""One contract over every registered adapter method and every layer type it supports.

Each case builds a tiny model, injects one adapter and checks the properties every method
must have: a zero-delta init leaves the output alone; unmerged == merged ==
merge_and_unload; merging twice is a no-op; unmerge restores the weight; a training step
moves only adapter parameters; only adapter (and head / bias) parameters require grad;
save -> load is exact; disable_adapter gives the base; safe_merge refuses a non-finite delta.

Methods that are not registered are simply not in ``available_methods()``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from lora_cli.adapters import (
    AdapterModel,
    LoraConfig,
    available_methods,
    get_adapter_model,
    get_method,
)
from lora_cli.errors import LoraCliError
from tests.adapters._layers import AttentionNet, Conv1dNet, Conv3dNet, GroupedConvNet
from tests.helpers import tiny_bert, tiny_gpt2, tiny_vit

ATOL = 1e-5

# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Target:
    """A layer type: a tiny model, the module(s) of that type to adapt, and an input."""

    build: Any
    modules: tuple[str, ...]
    inputs: Any
    example: Any  # a bare module of the same type, to ask a method whether it supports it


def _vit_inputs():
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "labels": torch.tensor([0, 2])}


def _token_inputs(labels: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 99, (2, 8), generator=g)
    return {"input_ids": ids, "labels": ids.clone() if labels == "lm" else torch.tensor([1, 2])}


def _signal_inputs():
    g = torch.Generator().manual_seed(1)
    return {"input_values": torch.randn(2, 3, 16, generator=g), "labels": torch.tensor([0, 2])}


def _video_inputs():
    g = torch.Generator().manual_seed(1)
    return {"input_values": torch.randn(2, 3, 4, 6, 6, generator=g), "labels": torch.tensor([0, 2])}


def _image_inputs():
    g = torch.Generator().manual_seed(1)
    return {"input_values": torch.randn(2, 4, 6, 6, generator=g), "labels": torch.tensor([0, 2])}


def _sequence_inputs():
    g = torch.Generator().manual_seed(1)
    return {"input_values": torch.randn(2, 5, 8, generator=g), "labels": torch.tensor([0, 2])}


def _conv1d_example():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(4, 3)


TARGETS = {
    "linear": Target(tiny_vit, ("q_proj", "v_proj"), _vit_inputs, lambda: nn.Linear(3, 4)),
    "conv1d": Target(tiny_gpt2, ("c_attn",), lambda: _token_inputs("lm"), _conv1d_example),
    "conv2d": Target(
        tiny_vit, ("embeddings.patch_embeddings.projection",), _vit_inputs, lambda: nn.Conv2d(3, 4, 2)
    ),
    "embedding": Target(tiny_bert, ("word_embeddings",), lambda: _token_inputs("cls"), lambda: nn.Embedding(5, 4)),
    # torch.nn.Conv1d, not GPT-2's Conv1D ("conv1d" above)
    "nn_conv1d": Target(Conv1dNet, ("conv1", "conv2"), _signal_inputs, lambda: nn.Conv1d(3, 4, 2)),
    "conv3d": Target(Conv3dNet, ("conv1", "conv2"), _video_inputs, lambda: nn.Conv3d(3, 4, 2)),
    "grouped_conv2d": Target(GroupedConvNet, ("grouped",), _image_inputs, lambda: nn.Conv2d(4, 4, 3, groups=2)),
    "multihead_attention": Target(AttentionNet, ("attn",), _sequence_inputs, lambda: nn.MultiheadAttention(8, 2)),
}


def tiny_mixtral():
    """transformers 5 Mixtral: experts stored as 3-D parameters (gate_up_proj, down_proj)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=99, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval()


# Targets only the cases below use (LoRA beside trainable tokens, LoRA on parameters)
EXTRA_TARGETS = {
    # GPT-2 ties lm_head to wte: trainable tokens follow into the output layer
    "gpt2_tokens": Target(tiny_gpt2, ("c_attn",), lambda: _token_inputs("lm"), lambda: nn.Linear(3, 4)),
    "bert_tokens": Target(tiny_bert, ("query", "value"), lambda: _token_inputs("cls"), lambda: nn.Linear(3, 4)),
    "moe_experts": Target(tiny_mixtral, ("q_proj",), lambda: _token_inputs("lm"), lambda: nn.Linear(3, 4)),
}
ALL_TARGETS = TARGETS | EXTRA_TARGETS
# token ids that occur in the inputs, so a training step reaches their rows
TOKEN_IDS = sorted(set(_token_inputs("cls")["input_ids"].flatten().tolist()))[:3]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# LoRA (DoRA too) on a grouped conv is never merged, in PEFT either, so it cannot take this
# contract's merge checks; tests/adapters/test_lora_more_layers.py checks it against PEFT.
UNMERGEABLE = {("lora", "grouped_conv2d")}

# --------------------------------------------------------------------------- configs

# init values whose adapter starts with a zero delta (output == base output)
ZERO_DELTA_DEFAULT = {"lora": True, "loha": True, "lokr": True, "adalora": True, "trainable_tokens": True}
# inits that rewrite the base weight (W <- W - s B A) but keep the output
REWRITES_BASE = ("pissa", "pissa_niter_2", "olora")


def _config(method: str, targets: list[str], init: Any, options: dict[str, Any]):
    if method == "lora":
        kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": init} | options
        return LoraConfig(target_modules=targets, **kwargs)
    if method == "loha":
        from lora_cli.adapters import LoHaConfig

        return LoHaConfig(r=4, alpha=8, init_weights=init, target_modules=targets, **options)
    if method == "lokr":
        from lora_cli.adapters import LoKrConfig

        return LoKrConfig(r=4, alpha=8, init_weights=init, target_modules=targets, **options)
    if method == "adalora":
        from lora_cli.adapters import AdaLoraConfig

        return AdaLoraConfig(
            init_r=4, target_r=2, total_step=10, init_lora_weights=init, target_modules=targets, **options
        )
    if method == "trainable_tokens":
        from lora_cli.adapters.methods.trainable_tokens.config import TrainableTokensConfig

        # its default target: the input embedding (and the output layer tied to it)
        return TrainableTokensConfig(token_indices=TOKEN_IDS, init_weights=init, **options)
    raise AssertionError(f"no config factory for registered method {method!r}: add one to this table")


@dataclass(frozen=True)
class Case:
    method: str
    layer: str
    init: Any = True
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        extra = "-".join(f"{k}={v}" for k, v in self.options.items() if k != "rank_pattern")
        if "rank_pattern" in self.options:
            extra += "patterns"
        return "-".join(str(p) for p in (self.method, self.layer, f"init={self.init}", extra) if p)


LORA_OPTION_CASES = [
    Case("lora", "linear", False),
    Case("lora", "linear", "gaussian"),
    Case("lora", "linear", "pissa"),
    Case("lora", "linear", "pissa_niter_2"),
    Case("lora", "linear", "olora"),
    Case("lora", "linear", "orthogonal"),
    Case("lora", "conv1d", "pissa"),
    Case("lora", "conv1d", "olora"),
    Case("lora", "linear", True, {"use_rslora": True}),
    Case("lora", "linear", True, {"use_dora": True}),
    Case("lora", "conv1d", True, {"use_dora": True}),
    Case("lora", "conv2d", True, {"use_dora": True}),
    Case("lora", "embedding", True, {"use_dora": True}),
    Case("lora", "nn_conv1d", False),
    Case("lora", "nn_conv1d", True, {"use_dora": True, "lora_dropout": 0.1}),
    Case("lora", "linear", True, {"bias": "all"}),
    Case("lora", "linear", True, {"bias": "lora_only"}),
    Case("lora", "conv1d", True, {"bias": "lora_only"}),
    Case("lora", "linear", True, {"modules_to_save": ["classifier"], "lora_dropout": 0.1}),
    Case("lora", "linear", True, {"rank_pattern": {"layers.1.attention.q_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
    Case("lora", "conv3d", False),
    Case("lora", "conv3d", True, {"use_dora": True}),
    Case("lora", "multihead_attention", False),
    Case("lora", "multihead_attention", True, {"use_rslora": True, "bias": "lora_only"}),
    Case("lora", "linear", True, {"lora_bias": True}),
    Case("lora", "conv1d", False, {"lora_bias": True}),
    Case("lora", "conv2d", True, {"lora_bias": True}),
    Case("lora", "conv3d", False, {"lora_bias": True}),
    Case("adalora", "conv2d", False),
    Case("loha", "grouped_conv2d", False),
    Case("lokr", "grouped_conv2d", False),
    Case("trainable_tokens", "gpt2_tokens", True),
    Case("trainable_tokens", "gpt2_tokens", False),
    Case("lora", "gpt2_tokens", False, {"trainable_token_indices": TOKEN_IDS}),
    Case("lora", "bert_tokens", False, {"trainable_token_indices": {"word_embeddings": TOKEN_IDS}}),
    Case("lora", "moe_experts", False, {"target_parameters": EXPERT_PARAMS}),
    Case("lora", "moe_experts", True, {"target_parameters": EXPERT_PARAMS, "use_rslora": True,
                                       "rank_pattern": {"experts.gate_up_proj": 1, "experts.down_proj": 2}}),
]
# nn_conv1d with init True is generated by _cases; these add random inits and the Tucker form
LYCORIS_CONV1D_CASES = [
    Case("loha", "nn_conv1d", False),
    Case("loha", "nn_conv1d", False, {"use_effective_conv2d": True}),
    Case("lokr", "nn_conv1d", False),
    Case("lokr", "nn_conv1d", "lycoris"),
]


def _supports(method: str, layer: str) -> bool:
    return get_method(method).supports(TARGETS[layer].example())


def _cases() -> list[Case]:
    cases = []
    for method in available_methods():
        if method == "trainable_tokens":  # its cases are below, on a model where tokens matter
            continue
        for layer in TARGETS:
            if _supports(method, layer) and (method, layer) not in UNMERGEABLE:
                cases.append(Case(method, layer, ZERO_DELTA_DEFAULT.get(method, True)))
        if method != "lora" and _supports(method, "linear"):
            cases.append(Case(method, "linear", False))
    return cases + LORA_OPTION_CASES + LYCORIS_CONV1D_CASES


def test_lora_supports_every_layer_type_and_embedding_is_lora_only():
    assert "lora" in available_methods()
    assert all(_supports("lora", layer) for layer in TARGETS)
    for method in available_methods():
        if method not in ("lora", "trainable_tokens"):  # trainable tokens adapt embeddings only
            assert not _supports(method, "embedding"), method


# --------------------------------------------------------------------------- helpers


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def _layer_weights(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {path: layer.base_weight().detach().clone() for path, layer in model.adapter_layers()}


def _expected_trainable(model: AdapterModel, method: str, options: dict) -> set[str]:
    """Names that should require grad, worked out from PEFT's naming, not from the engine."""
    prefix = re.escape(get_method(method).prefix)
    bias = options.get("bias", "none")
    out = set()
    for name, _ in model.named_parameters():
        adapter = re.search(rf"\.{prefix}\w+\.default$", name) or ".modules_to_save.default." in name
        all_bias = bias == "all" and name.endswith("bias") and ".original_module." not in name
        layer_bias = bias == "lora_only" and name.endswith(".base_layer.bias")
        tokens = bool(options.get("trainable_token_indices")) and name.endswith(".trainable_tokens_delta.default")
        if adapter or all_bias or layer_bias or tokens:
            out.add(name)
    return out


def _perturb(model: AdapterModel) -> None:
    """Non-zero adapter weights, so no check below is trivially true."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in model.adapter_parameters():
            param.add_(torch.randn(param.shape, generator=g).to(param.dtype) * 0.1)


@pytest.fixture(params=_cases(), ids=lambda c: c.id)
def case(request):
    return request.param


# --------------------------------------------------------------------------- the contract


def test_contract(case: Case, tmp_path):
    target = ALL_TARGETS[case.layer]
    inputs = target.inputs()
    pristine = target.build().eval()  # eval: nn.MultiheadAttention takes its fast path in both
    base_logits = _logits(pristine, inputs)

    config = _config(case.method, list(target.modules), case.init, case.options)
    model = target.build()
    torch.manual_seed(3)  # pissa_niter's randomised SVD draws: the same again on load
    model = get_adapter_model(model, config)
    model.eval()
    assert model.targets["default"], "nothing was adapted"

    # 1. init: the output is the base output (pissa/olora move W into A, B; output stays)
    if case.init is not False:
        atol = {"orthogonal": 1e-6}.get(case.init, 1e-4 if case.init in REWRITES_BASE else 0)
        torch.testing.assert_close(_logits(model, inputs), base_logits, atol=atol, rtol=0)
    if case.init in REWRITES_BASE:
        changed = [p for p, layer in model.adapter_layers() if not torch.equal(
            layer.base_layer.weight, pristine.get_submodule(p).weight)]
        assert changed, f"{case.init} should rewrite the base weight"

    # 2. only adapter / head / bias parameters require grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == _expected_trainable(model, case.method, case.options)

    _perturb(model)
    residual = copy.deepcopy(model).unload()  # the base as the adapter sees it
    residual_logits = _logits(residual, inputs)
    if case.init not in REWRITES_BASE:
        torch.testing.assert_close(residual_logits, base_logits, atol=0, rtol=0)
    unmerged = _logits(model, inputs)
    assert (unmerged - residual_logits).abs().max() > 1e-3, "the perturbed adapter has no effect"

    # 3. disable_adapter gives the base output, and the adapter back afterwards
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, inputs), residual_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(model, inputs), unmerged, atol=0, rtol=0)

    # 4. unmerged == merged == merge_and_unload; merging twice is a no-op; unmerge restores
    before = _layer_weights(model)
    model.merge_adapter()
    merged_weights = _layer_weights(model)
    assert any(not torch.equal(before[p], merged_weights[p]) for p in before)
    torch.testing.assert_close(_logits(model, inputs), unmerged, atol=ATOL, rtol=0)
    model.merge_adapter()
    for path, weight in _layer_weights(model).items():
        assert torch.equal(weight, merged_weights[path]), f"second merge changed {path}"
    model.unmerge_adapter()
    for path, weight in _layer_weights(model).items():
        torch.testing.assert_close(weight, before[path], atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(model, inputs), unmerged, atol=ATOL, rtol=0)
    plain = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, type(next(model.adapter_layers())[1])) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, inputs), unmerged, atol=ATOL, rtol=0)

    # 5. save -> from_pretrained on a fresh base is exact. As in PEFT, an adapter saved with
    # a base-rewriting init is loaded onto the original base and redoes the rewrite.
    model.save_pretrained(tmp_path / "adapter")
    fresh = target.build()
    torch.manual_seed(3)
    loaded = AdapterModel.from_pretrained(fresh, tmp_path / "adapter")
    assert (_logits(loaded, inputs) - unmerged).abs().max().item() == 0
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded for inference must be frozen"

    # 6. safe_merge refuses a non-finite delta and leaves every weight as it was
    broken = copy.deepcopy(model)
    live = {id(p) for p in broken.parameters()}  # a tied layer's tensors are copies of its owner's
    param = next(t for _, layer in reversed(list(broken.adapter_layers()))
                 for _, t in layer.adapter_tensors("default") if id(t) in live)
    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    weights = _layer_weights(broken)
    with pytest.raises(LoraCliError, match="NaN/inf"):
        broken.merge_and_unload(safe_merge=True)
    assert not any(layer.merged for _, layer in broken.adapter_layers())
    for path, weight in _layer_weights(broken).items():
        assert torch.equal(weight, weights[path]), f"a refused merge changed {path}"

    # 7. one SGD step on a real loss moves the adapter, not the base
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tuned = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"base parameter {name} moved"
        else:
            assert not torch.equal(param, tuned[name]), f"trainable parameter {name} did not move"
