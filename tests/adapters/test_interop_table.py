"""PEFT interop as one table: method x model kind x options, each row checked both ways.

A row is saved by one tool and loaded by the other, and the loaded model must give the
saver's outputs (atol 1e-5): loracli saves -> PEFT's ``PeftModel.from_pretrained`` loads,
and PEFT saves -> ``AdapterModel.from_pretrained`` loads. Nothing trains: adapter weights
start non-zero (``init_lora_weights=False`` / ``init_weights=False``) and every trainable
tensor (adapter factors, DoRA magnitudes, biases, modules_to_save copies) is perturbed, so
a key dropped or misnamed on either side, a wrong shape or a wrong formula changes the
outputs; each row first checks that the adapter moves the outputs at all.

What the per-method files check beyond the round trip (file keys and shapes, merging,
gradients, refusals, base rewrites) stays there. To cover a new method, add it to METHODS
and its rows to TABLE.
"""

from __future__ import annotations

import peft
import pytest
import torch

from lora_cli.adapters import AdapterModel, LoHaConfig, LoKrConfig, LoraConfig, get_adapter_model
from lora_cli.adapters.methods.adalora.config import AdaLoraConfig
from tests.adapters import _layers
from tests.helpers import tiny_bert, tiny_gpt2, tiny_opt, tiny_vit

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups")

ADALORA_SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 2, "total_step": 7}
METHODS = {
    # name: (loracli config, PEFT config, settings every row of the method starts from)
    "lora": (LoraConfig, peft.LoraConfig, {"r": 4, "lora_alpha": 8, "init_lora_weights": False}),
    "loha": (LoHaConfig, peft.LoHaConfig, {"init_weights": False}),
    "lokr": (LoKrConfig, peft.LoKrConfig, {"init_weights": False}),
    "adalora": (AdaLoraConfig, peft.AdaLoraConfig, {"init_lora_weights": False, **ADALORA_SCHEDULE}),
}


def _pixels():
    return {"pixel_values": _layers.seeded_randn(2, 3, 32, 32)}


def _ids():
    return {"input_ids": torch.randint(2, 99, (2, 8), generator=torch.Generator().manual_seed(1))}


def _transformers(build, inputs):
    return build, lambda model: model(**inputs()).logits


def _plain(name):
    build, _, make_input = _layers.NETS[name]
    return build, lambda model: model(make_input())


MODELS = {
    "vit": _transformers(tiny_vit, _pixels),
    "gpt2": _transformers(tiny_gpt2, _ids),
    "bert": _transformers(tiny_bert, _ids),
    "opt": _transformers(tiny_opt, _ids),
    **{name: _plain(name) for name in _layers.NETS},
}
"""Model kind -> (build a fresh base, run a model on the kind's fixed input)."""

QV = ["q_proj", "v_proj"]
VIT_CONV = ["q_proj", "v_proj", "embeddings.patch_embeddings.projection"]


def _on(name, **kw):
    """A row on one of the plain models, targeting the modules NETS names for it."""
    return name, {"target_modules": _layers.NETS[name][1]} | kw


TABLE = [
    # -------------------------------------------------------- LoRA on transformers models
    ("lora", "vit", {"target_modules": QV}),
    ("lora", "gpt2", {"target_modules": ["c_attn"]}),
    ("lora", "bert", {"target_modules": ["query", "value"]}),
    ("lora", "opt", {"target_modules": QV}),
    ("lora", "vit", {"target_modules": QV, "use_rslora": True}),
    ("lora", "vit", {"target_modules": QV, "use_dora": True}),
    ("lora", "gpt2", {"target_modules": ["c_attn"], "use_dora": True}),
    ("lora", "vit", {"target_modules": QV, "bias": "all"}),
    ("lora", "bert", {"target_modules": ["query", "value"], "bias": "lora_only"}),
    ("lora", "vit", {"target_modules": QV, "modules_to_save": ["classifier"]}),
    ("lora", "bert", {"target_modules": ["query"], "modules_to_save": ["classifier"], "bias": "all"}),
    ("lora", "vit", {"target_modules": [*QV, "fc1"], "rank_pattern": {"layers.1.attention.q_proj": 2, "fc1": 6},
                     "alpha_pattern": {"v_proj": 3}}),
    ("lora", "vit", {"target_modules": ["q_proj"], "init_lora_weights": "pissa"}),
    ("lora", "opt", {"target_modules": ["v_proj"], "init_lora_weights": "olora"}),
    ("lora", "gpt2", {"target_modules": ["c_attn"], "init_lora_weights": "pissa"}),
    ("lora", "vit", {"target_modules": ["projection"]}),
    ("lora", "bert", {"target_modules": ["word_embeddings"]}),
    ("lora", "vit", {"target_modules": "all-linear", "modules_to_save": ["classifier"]}),
    ("lora", "opt", {"target_modules": "all-linear"}),
    ("lora", "vit", {"target_modules": "all-linear"}),
    ("lora", "gpt2", {"target_modules": "all-linear"}),
    ("lora", "vit", {"target_modules": r".*layers\.1\..*(q_proj|k_proj)", "exclude_modules": ["k_proj"]}),
    ("lora", "vit", {"target_modules": [*QV, "projection"], "lora_bias": True}),
    ("lora", "gpt2", {"target_modules": ["c_attn"], "lora_bias": True, "use_rslora": True}),
    # ------------------------------------------- LoRA on the other layer kinds PEFT adapts
    ("lora", *_on("conv2d", use_dora=True)),
    ("lora", *_on("conv2d", use_dora=True, use_rslora=True)),
    ("lora", *_on("conv1d")),
    ("lora", *_on("conv1d", use_dora=True)),
    ("lora", *_on("embedding", use_dora=True)),
    ("lora", *_on("grouped2d")),
    ("lora", *_on("grouped1d", r=6)),
    ("lora", *_on("conv3d")),
    ("lora", *_on("conv3d", use_dora=True)),
    ("lora", *_on("grouped2d", use_dora=True)),
    ("lora", *_on("grouped1d", r=6, use_dora=True)),
    ("lora", *_on("attention")),
    ("lora", *_on("attention", use_rslora=True, r=3)),
    ("lora", *_on("conv2d", lora_bias=True)),
    ("lora", *_on("conv3d", lora_bias=True)),
    ("lora", *_on("grouped2d", lora_bias=True)),
    # ------------------------------------------------------------------------------ LoHa
    ("loha", "vit", {"target_modules": VIT_CONV, "r": 4, "alpha": 12}),
    ("loha", "vit", {"target_modules": VIT_CONV, "r": 2, "alpha": 6, "use_effective_conv2d": True}),
    ("loha", *_on("plain", r=3, alpha=5)),
    ("loha", *_on("plain", r=2, use_effective_conv2d=True)),
    ("loha", *_on("conv1d-taps", r=2, alpha=5)),
    ("loha", *_on("conv1d-taps", r=2, alpha=5, use_effective_conv2d=True)),
    # ------------------------------------------------------------------------------ LoKr
    ("lokr", "vit", {"target_modules": VIT_CONV, "r": 8, "alpha": 3}),
    ("lokr", "vit", {"target_modules": VIT_CONV, "r": 2}),
    ("lokr", "vit", {"target_modules": VIT_CONV, "r": 1, "decompose_both": True}),
    ("lokr", "vit", {"target_modules": VIT_CONV, "r": 1, "decompose_factor": 8}),
    ("lokr", "vit", {"target_modules": VIT_CONV, "r": 4, "decompose_factor": 2}),
    ("lokr", "vit", {"target_modules": VIT_CONV, "r": 2, "decompose_factor": 3}),
    ("lokr", "vit", {"target_modules": VIT_CONV, "r": 2, "use_effective_conv2d": True}),
    ("lokr", *_on("plain", r=1, alpha=3, use_effective_conv2d=True)),
    ("lokr", *_on("plain", r=6, alpha=3)),
    ("lokr", *_on("conv1d-taps", r=8, alpha=3)),
    ("lokr", *_on("conv1d-taps", r=1, alpha=3)),
    ("lokr", *_on("conv1d-taps", r=2, alpha=3, use_effective_conv2d=True)),
    ("lokr", *_on("conv1d-taps", r=2, decompose_both=True)),
    ("lokr", *_on("conv1d-taps", r=2, decompose_both=True, use_effective_conv2d=True)),
    ("lokr", *_on("conv1d-taps", r=2, decompose_factor=2)),
    # --------------------------------------------------------------------------- AdaLoRA
    ("adalora", "bert", {"target_modules": ["query", "value"]}),
    ("adalora", "gpt2", {"target_modules": ["c_attn"]}),
    ("adalora", "vit", {"target_modules": QV}),
    ("adalora", *_on("conv2d-dilated", init_r=3, tfinal=1, deltaT=1, total_step=5, lora_alpha=5)),
]


def _row_id(row) -> str:
    method, model, kw = row
    shown = []
    for key, value in kw.items():
        if key == "target_modules":
            if model not in _layers.NETS:
                shown.append(value if isinstance(value, str) else "+".join(v.rsplit(".", 1)[-1] for v in value))
        elif key in ("rank_pattern", "alpha_pattern"):
            shown.append(key.split("_")[0] + "s")
        elif key not in ADALORA_SCHEDULE:
            shown.append(f"{key}={value}")
    return "-".join([method, model, *shown])


def _outputs(run, model) -> torch.Tensor:
    with torch.no_grad():
        return run(model.eval())


@pytest.mark.parametrize("direction", ["loracli-to-peft", "peft-to-loracli"])
@pytest.mark.parametrize("row", TABLE, ids=_row_id)
def test_round_trip_gives_the_savers_outputs(row, direction, tmp_path):
    method, model_kind, kw = row
    ours_cls, theirs_cls, defaults = METHODS[method]
    build, run = MODELS[model_kind]
    settings = defaults | kw
    if direction == "loracli-to-peft":
        saver = get_adapter_model(build(), ours_cls(**settings))
    else:
        saver = peft.get_peft_model(build(), theirs_cls(**settings))
    _layers.perturb_trainable(saver)
    expected = _outputs(run, saver)
    assert (expected - _outputs(run, build())).abs().max() > 20 * ATOL, "the adapter has no effect"
    saver.save_pretrained(tmp_path)
    if direction == "loracli-to-peft":
        loaded = peft.PeftModel.from_pretrained(build(), tmp_path)
    else:
        loaded = AdapterModel.from_pretrained(build(), tmp_path)
        assert type(loaded.peft_config["default"]) is ours_cls
    torch.testing.assert_close(_outputs(run, loaded), expected, atol=ATOL, rtol=0)


def test_the_table_rows_are_unique_and_cover_every_method():
    ids = [_row_id(row) for row in TABLE]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert {row[0] for row in TABLE} == set(METHODS)
