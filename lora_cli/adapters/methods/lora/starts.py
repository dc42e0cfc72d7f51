"""LoRA's starts: what ``init_lora_weights`` does, one descriptor each, in one table.

    name          layer kinds        rewrites base   needs data (calibration pass)   settings
    True, False   every LoRA kind    -               -                                -
    gaussian      every LoRA kind    -               -                                -
    pissa[_niter] Linear, Conv1D     yes             -                                -
    olora         Linear, Conv1D     yes             -                                -
    orthogonal    Linear, Conv1D     -               -                                (an even r)
    eva           every LoRA kind    -               EVA (Linear, Conv1D decomposed)  eva_config
    corda         Linear, Conv1D     yes             CorDA                            corda_config
    mica          Linear, Conv1D, Embedding  -       -                                (no DoRA)
    loftq         Linear, Conv1D     yes             -                                loftq_config
    lora_ga       Linear, Conv1D     yes             LoRA-GA                          lora_ga_config

Every place that needs to know a start reads :data:`STARTS`: the config's checks
(``LoraConfig.problems``), the layer that starts an adapter (``LoraLayer.add``: refused kinds
and the start's per-layer function), the calibration pass of ``loracli train`` and its
``--resume`` (``needs_data``), saving relative to the original base and rebuilding a rewritten
base on ``--resume`` (``rewrites_base``), and the recipe's checks of a quantized base. As in
PEFT, an embedding gets the plain start under PiSSA, OLoRA, orthogonal and CorDA.

This module imports no torch: a start's functions are named as ``"module:function"`` below
this package and loaded when they run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lora_cli.adapters import kinds
from lora_cli.adapters.checks import check_init_settings
from lora_cli.adapters.kinds import CONV2D, CONV3D, EMBEDDING, HF_CONV1D, LINEAR, MHA, TORCH_CONV1D
from lora_cli.adapters.registry import load
from lora_cli.errors import Problem

HERE = "lora_cli.adapters.methods.lora"
EVERY_KIND = (LINEAR, HF_CONV1D, TORCH_CONV1D, CONV2D, CONV3D, EMBEDDING, MHA)
"""The layer kinds LoRA wraps (MultiheadAttention takes the plain starts only, see ``mha.py``)."""
MATRICES = (LINEAR, HF_CONV1D)
"""Layers whose weight is one (out, in) matrix: the SVD- and QR-based starts need one."""

# ------------------------------------------------------------------ settings of the starts
EVA_DEFAULTS: dict[str, Any] = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100,
                                "whiten": False, "adjust_scaling_factors": True}
CORDA_DEFAULTS: dict[str, Any] = {"cache_file": None, "covariance_file": None, "corda_method": "ipm", "verbose": False,
                                  "use_float16_for_covariance": False, "prune_temporary_fields": True}
LOFTQ_DEFAULTS: dict[str, Any] = {"loftq_bits": 4, "loftq_iter": 1}
LOFTQ_BITS = (2, 4, 8)
LORA_GA_DEFAULTS: dict[str, Any] = {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}
LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def parse_pissa_niter(init: object) -> int | None:
    """'pissa_niter_4' -> 4; anything else -> None."""
    match = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def _eva(config: Any) -> list[Problem]:
    """eva_config: EvaConfig's fields."""
    out, known = check_init_settings("eva_config", config.eva_config, init=config.init_lora_weights, wanted="eva",
                                     known=EVA_DEFAULTS, label="EVA", example="{rho: 2.0, tau: 0.99}")
    for key, value in known.items():
        where = f"eva_config.{key}"
        if key in ("use_label_mask", "whiten", "adjust_scaling_factors") and not isinstance(value, bool):
            out.append(Problem(where, "must be true or false", value))
        elif key == "label_mask_value" and (isinstance(value, bool) or not isinstance(value, int)):
            out.append(Problem(where, "must be an integer (the label of ignored tokens)", value))
        elif key in ("rho", "tau") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                        or not math.isfinite(value)):
            out.append(Problem(where, "must be a number", value))
        elif key == "rho" and value < 1.0:
            out.append(Problem(where, "must be >= 1.0 (a layer may take up to r * rho ranks)", value,
                               hint="use 1.0 for no redistribution, 2.0 (the default) to let ranks move"))
        elif key == "tau" and not 0.0 <= value <= 1.0:
            out.append(Problem(where, "must be between 0.0 and 1.0 (a cosine similarity)", value))
    return out


def _corda(config: Any) -> list[Problem]:
    """corda_config: CordaConfig's fields."""
    out, known = check_init_settings("corda_config", config.corda_config, init=config.init_lora_weights,
                                     wanted="corda", known=CORDA_DEFAULTS, label="CorDA", example="{corda_method: kpm}")
    for key, value in known.items():
        where = f"corda_config.{key}"
        if key == "corda_method" and value not in ("ipm", "kpm"):
            out.append(Problem(where, "must be 'ipm' or 'kpm'", value,
                               hint="ipm adapts the directions the data uses most; kpm keeps them and adapts the least used"))
        elif key in ("verbose", "use_float16_for_covariance", "prune_temporary_fields") and not isinstance(value, bool):
            out.append(Problem(where, "must be true or false", value))
        elif key in ("cache_file", "covariance_file") and value is not None and not (isinstance(value, str) and value):
            out.append(Problem(where, "must be a file path or null", value))
    return out


def _loftq(config: Any) -> list[Problem]:
    """loftq_config: PEFT's LoftQConfig fields; required with the loftq start."""
    out, known = check_init_settings("loftq_config", config.loftq_config, init=config.init_lora_weights, wanted="loftq",
                                     known=LOFTQ_DEFAULTS, label="LoftQ", example="loftq_config: {loftq_bits: 4, loftq_iter: 1}",
                                     required=True)
    if not known:
        return out
    bits = known.get("loftq_bits", 4)
    if isinstance(bits, bool) or bits not in LOFTQ_BITS:
        out.append(Problem("loftq_config", "loftq_bits must be 2, 4 or 8", bits, hint="4 (NF4) is LoftQ's usual choice"))
    iters = known.get("loftq_iter", 1)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        out.append(Problem("loftq_config", "loftq_iter must be an integer >= 1", iters, hint="1 to 5 alternating steps"))
    return out


def _lora_ga(config: Any) -> list[Problem]:
    """lora_ga_config: PEFT's LoraGAConfig fields (absent: its defaults)."""
    out, known = check_init_settings("lora_ga_config", config.lora_ga_config, init=config.init_lora_weights,
                                     wanted="lora_ga", known=LORA_GA_DEFAULTS, label="LoRA-GA",
                                     example="{direction: ArB2r, scale: stable}")
    if not known:
        return out
    for key, choices in (("direction", LORA_GA_DIRECTIONS), ("scale", LORA_GA_SCALES)):
        if key in known and known[key] not in choices:
            out.append(Problem("lora_ga_config", f"{key} must be one of {', '.join(choices)}", known[key]))
    gamma = known.get("stable_gamma", 16)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma <= 0:
        out.append(Problem("lora_ga_config", "stable_gamma must be a number > 0", gamma, hint="PEFT's default is 16"))
    return out


def _orthogonal(config: Any) -> list[Problem]:
    if config.init_lora_weights == "orthogonal" and isinstance(config.r, int) and config.r % 2:
        return [Problem("init_lora_weights", "'orthogonal' needs an even r", "orthogonal", hint=f"r is {config.r}")]
    return []


def _mica(config: Any) -> list[Problem]:
    if config.init_lora_weights == "mica" and config.use_dora is True:  # its B is frozen; DoRA is another variant
        return [Problem("use_dora", "cannot be combined with init_lora_weights: mica", True,
                        hint="set use_dora: false, or use another init")]
    return []


# ------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Start:
    """One value of ``init_lora_weights`` and what it means to every part of the engine."""

    name: bool | str
    """The ``init_lora_weights`` value; "pissa_niter_[N]" stands for pissa_niter_4, pissa_niter_16..."""
    layer_init: str
    """``"module:function"`` here: ``f(layer, adapter_name, config)`` starts A and B (and the base
    weight, for a start that rewrites it) of one layer, after the layer made them."""
    kinds: tuple[str, ...] = EVERY_KIND
    """The layer kinds its function starts; every other kind is refused, but for :attr:`plain_on`."""
    plain_on: tuple[str, ...] = ()
    """Kinds that get the plain start instead (PEFT starts an embedding one way under these)."""
    rewrites_base: bool = False
    """It changes base weights: saved relative to the original base, rebuilt exactly on --resume."""
    calibrate: str | None = None
    """``"module:function"``: the pass over calibration batches that sets the start after the model
    is built, ``f(model, batches, adapter_name=..., forward=...)`` -> {module path: rank}."""
    apply: str | None = None
    """``"module:function"``: ``f(layer, adapter_name, A, B)`` puts one layer's recorded start back,
    the base rewritten as the start itself rewrites it (``--resume`` of a calibrated run)."""
    repeats_batches: bool = False
    """The pass reads the batches again until its result is stable (EVA); the others read each once."""
    settings: str | None = None
    """The config field holding its settings (``eva_config``), filled in from :attr:`defaults`."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Any], list[Problem]] | None = None
    """Problems of a LoRA config with this start, or with this start's settings given for another."""

    @property
    def needs_data(self) -> bool:
        """A calibration pass over training batches sets the start (``loracli train`` runs it)."""
        return self.calibrate is not None

    def matches(self, init: Any) -> bool:
        if self.name == "pissa_niter_[N]":
            return parse_pissa_niter(init) is not None
        return not isinstance(init, (dict, list, set)) and init == self.name

    def refusal(self, init: Any, kind: str | None, layer_type: str) -> str | None:
        """Why this start cannot start a ``layer_type`` layer of ``kind`` (with the fix), or None."""
        if kind in self.kinds or kind in self.plain_on:
            return None
        return (f"init_lora_weights={init!r} supports {kinds.shown(self.kinds)} layers only, not {layer_type}; "
                "use init_lora_weights: true or exclude this module")

    def layer_function(self, kind: str | None) -> Callable[..., None]:
        """The per-layer function that starts a layer of ``kind``."""
        return load(f"{HERE}.{PLAIN if kind in self.plain_on else self.layer_init}")

    def calibration(self) -> Callable[..., Any]:
        """The calibration pass (see :attr:`calibrate`)."""
        return load(f"{HERE}.{self.calibrate}")

    def apply_function(self) -> Callable[..., None]:
        """The function that puts one layer's recorded start back (see :attr:`apply`)."""
        return load(f"{HERE}.{self.apply}")

    def settings_of(self, config: Any) -> dict[str, Any]:
        """The start's settings in ``config``, its defaults filled in."""
        return {**self.defaults, **((getattr(config, self.settings, None) if self.settings else None) or {})}


PLAIN = "inits:plain"
STARTS = (
    Start(True, PLAIN),
    Start(False, PLAIN),
    Start("gaussian", PLAIN),
    Start("pissa", "inits:pissa", MATRICES, plain_on=(EMBEDDING,), rewrites_base=True),
    Start("pissa_niter_[N]", "inits:pissa", MATRICES, plain_on=(EMBEDDING,), rewrites_base=True),
    Start("olora", "inits:olora", MATRICES, plain_on=(EMBEDDING,), rewrites_base=True),
    Start("orthogonal", "inits:orthogonal", MATRICES, plain_on=(EMBEDDING,), check=_orthogonal),
    Start("eva", PLAIN, calibrate="eva:initialize_eva_weights", apply="passes:set_factors", repeats_batches=True,
          settings="eva_config", defaults=EVA_DEFAULTS, check=_eva),
    Start("corda", PLAIN, MATRICES, plain_on=(EMBEDDING,), rewrites_base=True, calibrate="corda:preprocess_corda",
          apply="corda:apply_factors", settings="corda_config", defaults=CORDA_DEFAULTS, check=_corda),
    Start("mica", "mica:init_mica", (LINEAR, HF_CONV1D, EMBEDDING), check=_mica),
    Start("loftq", "loftq:init_loftq", MATRICES, rewrites_base=True, settings="loftq_config", defaults=LOFTQ_DEFAULTS,
          check=_loftq),
    Start("lora_ga", PLAIN, MATRICES, rewrites_base=True, calibrate="lora_ga:initialize_lora_ga_weights",
          apply="lora_ga:apply_factors", settings="lora_ga_config", defaults=LORA_GA_DEFAULTS, check=_lora_ga),
)
DATA_DRIVEN = tuple(s.name for s in STARTS if s.needs_data)
"""The starts a calibration pass sets: ``loracli train`` runs it on training batches."""


def find(init: Any) -> Start | None:
    """The start ``init_lora_weights`` = ``init`` names, or None."""
    return next((s for s in STARTS if s.matches(init)), None)


def rewrites_base(init: Any) -> bool:
    """Whether ``init_lora_weights`` = ``init`` changes base weights."""
    start = find(init)
    return start is not None and start.rewrites_base


def problems(config: Any) -> list[Problem]:
    """Every problem of ``config``'s ``init_lora_weights`` and the starts' settings."""
    init = config.init_lora_weights
    out = []
    if find(init) is None:
        out.append(Problem("init_lora_weights", f"must be one of {', '.join(repr(s.name) for s in STARTS)}", init))
    for start in STARTS:
        out += start.check(config) if start.check is not None else []
    return out


def plain_config(config: Any) -> Any:
    """``config`` with the plain start (``init_lora_weights: true``) and every start's settings at their
    defaults: how an adapter that no longer needs its start is described."""
    defaults = {f.name: f for f in dataclasses.fields(config)}
    reset = {}
    for start in STARTS:
        if start.settings in defaults:
            f = defaults[start.settings]
            reset[start.settings] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return config.replace(init_lora_weights=True, **reset)
