"""Export a run for llama.cpp: its LoRA adapter as a GGUF LoRA file, or the merged model as a GGUF model.

    report = export_gguf("runs/smol-chat", "smol-gguf/")                # smol-gguf/adapter.gguf + export.json
    report = export_gguf("runs/smol-chat", "smol-gguf/", merged=True)   # smol-gguf/model.gguf + export.json
    # llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --lora smol-gguf/adapter.gguf

Llama-architecture causal LMs (transformers ``model_type: llama``: Llama 2/3, SmolLM/SmolLM2,
TinyLlama, ...) only. The file formats, as llama.cpp reads them (facts from gguf-py's
constants and llama.cpp's converters and adapter loader):

- **Adapter** (``adapter.gguf``): metadata ``general.architecture = llama``, ``general.type =
  adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (float32); for every adapted
  weight, named as in the base GGUF (gguf's ``TensorNameMap``: ``blk.3.attn_q.weight``,
  ``blk.3.ffn_down.weight``, ``output.weight``), two tensors ``<name>.lora_a`` and
  ``<name>.lora_b``. In numpy order they are PyTorch's A (r, in) and B (out, r); GGUF lists
  dimensions the other way round (ne = [in, r] and [r, out]), which is what llama.cpp checks.
  llama.cpp adds ``alpha / r * B (A x)``, r read from each lora_b, one alpha per file.
- **Merged model** (``model.gguf``) and the **rotary layout** both follow: see
  :mod:`lora_cli.inference.gguf_model`.

One alpha per file, exact scalings: a layer's LoRA scale s (alpha / r, alpha / sqrt(r) with
rsLoRA, ``rank_pattern`` / ``alpha_pattern``) becomes the file's alpha = s * r when every layer
has the same s * r; otherwise alpha is the first layer's s * r and each lora_b is multiplied by
s * r / alpha (the report says so). A non-LoRA method, DoRA (llama.cpp has no magnitude
vector), ``lora_bias``, trained modules (``modules_to_save``, trainable tokens, biases), LoRA on
the embedding or on a tied ``lm_head``, and LoftQ's rewritten base weights have no place in a
GGUF LoRA: they are refused (exit 2) with the fix, usually ``--merged``.

Checks before anything is written (the file is built in a temporary sibling of ``--out`` and
renamed into place only if they pass): the file is read back with gguf's ``GGUFReader`` and
every tensor must equal what was meant; then, read the way llama.cpp reads it (alpha / r,
rotary order undone), each adapted layer's update ``alpha / r * B A`` must match the engine's
own delta of the run's adapter within float tolerance (float16 within its rounding). The
merged model is first merged and verified exactly as ``loracli merge`` does (logits), and the
GGUF's tensors, read back and the rotary order undone, must equal the verified weights.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_cli import rundir as rd
from lora_cli.atomic import atomic_dir
from lora_cli.errors import UserInputError
from lora_cli.inference.gguf_model import (
    DTYPES,
    GgufExportError,
    check_architecture,
    field_value,
    finish,
    name_map,
    read_tensor,
    rope_settings,
    rotary_heads,
    sha256,
    to_rotary,
    tokenizer_kind,
    torch_dtype,
    write_model_gguf,
)
from lora_cli.recipe import load_recipe

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.gguf"
MODEL_FILE = "model.gguf"
REPORT_FILE = "export.json"
INSTALL_HINT = "install the GGUF extra: pip install 'loracli[gguf]' (the gguf package)"
DELTA_RTOL = {"float32": 1e-5, "float16": 4e-3}
"""Tolerance on each layer's update, relative to its largest entry: float32 sums in another
order; float16 rounds A and B (11-bit mantissa). A wrong layout or scale is off by O(1)."""

@dataclass
class GgufExportReport:
    out_dir: str
    kind: str
    """"adapter" (a GGUF LoRA for the base's own GGUF) or "merged" (a whole GGUF model)."""
    file: str
    architecture: str
    dtype: str
    tensors: int
    bytes: int
    sha256: str
    checks: list[str]
    max_rel_error: float
    """Adapter: the largest per-layer ||delta read back - engine delta||_max / ||engine delta||_max.
    Merged: the largest |GGUF tensor - merged weight| (0 in float32)."""
    alpha: float | None = None
    ranks: list[int] = field(default_factory=list)
    layers: int = 0
    folded_scaling: bool = False
    tokenizer: dict[str, Any] | None = None
    merge: dict[str, Any] | None = None
    inputs: str | None = None
    """The merge verification's inputs ("validation" or "synthetic"); None for an adapter file."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        path = Path(self.out_dir) / self.file
        if self.kind == "adapter":
            ranks = ",".join(map(str, self.ranks))
            folded = " (per-layer scales folded into lora_b)" if self.folded_scaling else ""
            return (
                f"GGUF LoRA ({self.architecture}, {self.dtype}): {self.layers} adapted weight(s), rank {ranks}, "
                f"alpha {self.alpha:g}{folded}; read back and checked against the run's adapter (largest "
                f"relative update difference {self.max_rel_error:.2g}); written to {path} ({self.bytes / 1e6:.2f} MB). "
                "Use it with the base model's own GGUF: llama-cli -m BASE.gguf --lora " + str(path)
            )
        merge = self.merge or {}
        return (
            f"merge verified on {merge.get('num_inputs')} {merge.get('inputs')} input(s) (max |logit diff| "
            f"{merge.get('max_abs_diff', float('nan')):.3g}, tolerance {merge.get('tolerance', float('nan')):.3g}); "
            f"GGUF model ({self.architecture}, {self.dtype}, {self.tensors} tensors, tokenizer "
            f"{(self.tokenizer or {}).get('pre')}, chat template {'kept' if (self.tokenizer or {}).get('chat_template') else 'none'}) "
            f"read back equal to the merged weights (max |diff| {self.max_rel_error:.3g}); written to {path} "
            f"({self.bytes / 1e6:.1f} MB). Run it: llama-cli -m {path}"
        )


def default_out_dir(run_dir: str | Path) -> Path:
    """``runs/NAME`` -> ``runs/NAME-gguf``, beside the run (never inside it)."""
    return rd.beside_run(run_dir, "gguf")


def export_gguf(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    merged: bool = False,
    dtype: str = "float32",
    n: int = 16,
    force: bool = False,
) -> GgufExportReport:
    """Write the run's LoRA adapter (or, with ``merged``, the merged model) as GGUF for llama.cpp."""
    run_dir = Path(run_dir)
    if dtype not in DTYPES:
        raise UserInputError(f"--dtype {dtype!r} is not supported for GGUF; choose one of {', '.join(DTYPES)}")
    if n < 1:
        raise UserInputError(f"--n must be at least 1 (validation inputs that verify the merge), got {n}")
    if importlib.util.find_spec("gguf") is None:
        raise UserInputError(f"loracli export --format gguf needs the gguf package: {INSTALL_HINT}")
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dir)
    # the folder rule (rundir.guard): --force replaces only an earlier export; before the slow model load
    replace = rd.check_output_dir(out, rd.Output("--out", "export", REPORT_FILE, f"{default_out_dir(run_dir)}/"),
                                  reads=[run_dir], replace=force)
    rd.check_run_links(run_dir)
    recipe = _check_run(run_dir)
    if merged:
        return _export_merged(run_dir, out, recipe, dtype, n, replace)
    return _export_adapter(run_dir, out, dtype, replace)


# ---------------------------------------------------------------------------- checks
def _check_run(run_dir: Path) -> Any:
    """The run's recipe, once its task and (where it can be told without loading) its base fit."""
    recipe_file = run_dir / rd.RECIPE_FILE
    if not recipe_file.is_file():
        raise UserInputError(f"{run_dir} is not a run directory (no {rd.RECIPE_FILE}); pass the folder `loracli train` wrote")
    recipe = load_recipe(recipe_file)
    if recipe.task != "causal-lm":
        raise UserInputError(
            f"{run_dir} is a {recipe.task} run; GGUF export is for causal-lm runs on a Llama-architecture base "
            "(llama.cpp runs language models). Use --format onnx for classifiers, or `loracli merge`"
        )
    model_type = _cheap_model_type(run_dir, recipe)
    if model_type is not None:
        check_architecture(model_type, run_dir)
    return recipe


def _cheap_model_type(run_dir: Path, recipe: Any) -> str | None:
    """The base's model_type from a config on disk or in the recipe; None for a hub id (told after loading)."""
    if recipe.model.config:
        return recipe.model.config.get("model_type")
    config = Path(recipe.model.name_or_path or "").expanduser() / "config.json"
    if not recipe.model.name_or_path or not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None



def _adapter_refusal(run_dir: Path) -> str | None:
    """Why the run's adapter cannot be a GGUF LoRA (with the fix), from its files alone; None if it can."""
    from lora_cli.adapters import AdapterConfig
    from lora_cli.adapters.base_weights import BASE_REWRITES_NAME

    adapter_dir = run_dir / rd.ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        return None  # load_run explains the missing adapter
    config = AdapterConfig.from_pretrained(adapter_dir)
    merged = "or write the merged model instead: `loracli export RUN --format gguf --merged`"
    if config.peft_type != "LORA":
        if config.method in ("loha", "lokr"):
            return (f"a {config.method} adapter cannot be a GGUF LoRA (llama.cpp loads plain LoRA only). Convert it "
                    f"first: `loracli convert {run_dir} --to lora --out {run_dir}-lora` and export that run, {merged}")
        fix = merged if not getattr(config, "merge_refusal", None) else "llama.cpp loads plain LoRA adapters only"
        return f"a {config.method} adapter cannot be a GGUF LoRA; {fix}"
    what = []
    if config.use_dora:
        what.append("DoRA (use_dora: llama.cpp has no DoRA magnitude vector)")
    if config.lora_bias:
        what.append("lora_bias (llama.cpp's LoRA has no bias)")
    if config.modules_to_save:
        what.append(f"modules trained in full ({', '.join(config.modules_to_save)}: modules_to_save)")
    if config.trainable_token_indices:
        what.append("trainable tokens (trainable_token_indices)")
    if config.target_parameters:
        what.append("LoRA on parameters (target_parameters)")
    if config.bias != "none":
        what.append(f"trained biases (bias: {config.bias})")
    if (adapter_dir / BASE_REWRITES_NAME).is_file():
        what.append(f"base weights its init rewrote ({BASE_REWRITES_NAME}: LoftQ), which the base GGUF lacks")
    if what:
        return f"the adapter has {'; '.join(what)}, which a GGUF LoRA cannot hold; {merged}"
    return None


# ---------------------------------------------------------------------------- adapter
@dataclass
class _Pair:
    name: str
    """The base weight's GGUF name (``blk.0.attn_q.weight``)."""
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r), llama.cpp's row order, scale folded in
    delta: torch.Tensor  # the engine's own update of the layer, (out, in)


def _export_adapter(run_dir: Path, out: Path, dtype: str, replace: bool) -> GgufExportReport:
    from lora_cli.inference.loading import load_run

    refusal = _adapter_refusal(run_dir)
    if refusal:
        raise UserInputError(f"{run_dir}: {refusal}")
    loaded = load_run(run_dir, device="cpu")
    model = loaded.model
    config = model.get_base_model().config
    architecture = check_architecture(getattr(config, "model_type", None), run_dir)
    name = model.active_adapter
    names, heads = name_map(config, architecture), rotary_heads(config)
    layers = []
    with torch.no_grad():
        for path, layer in model.adapter_layers():
            if name not in getattr(layer, "r", {}):
                continue
            layers.append((path, layer, _gguf_weight_name(path, layer, config, names, run_dir)))
        if not layers:
            raise UserInputError(f"{run_dir}: the adapter adapts no layer; there is nothing to export")
        scales = [(float(layer.scaling[name]), int(layer.r[name])) for _, layer, _ in layers]
        products = [s * r for s, r in scales]
        alpha = next((p for p in products if p != 0), 1.0)
        folded = any(abs(p - alpha) > 1e-6 * abs(alpha) for p in products)
        pairs = []
        for (_, layer, gname), (s, r) in zip(layers, scales):
            a, b = (t.detach().float().cpu() for t in layer.factors(name))
            b = to_rotary(b * (s * r / alpha) if folded else b, gname, heads)
            pairs.append(_Pair(gname, a.contiguous(), b.contiguous(), layer.get_delta_weight(name).detach().float().cpu()))

    with atomic_dir(out, replace=replace) as staging:
        path = staging / ADAPTER_FILE
        _write_adapter(path, architecture, alpha, pairs, dtype, run_name=loaded.recipe.name)
        worst = _verify_adapter(path, architecture, alpha, pairs, heads, dtype)
        report = GgufExportReport(
            str(out), "adapter", ADAPTER_FILE, architecture, dtype, 2 * len(pairs), path.stat().st_size,
            sha256(path), ["read back with gguf.GGUFReader: names, shapes, dtypes, values, alpha, architecture",
                            "alpha / r * B A (rotary order undone) = the engine's delta of every adapted layer"],
            worst, alpha=alpha, ranks=sorted({r for _, r in scales}), layers=len(pairs), folded_scaling=folded,
        )
        rd.write_json(staging / REPORT_FILE, report.to_dict())
    return report


def _gguf_weight_name(path: str, layer: Any, config: Any, names: Any, run_dir: Path) -> str:
    """The GGUF name of an adapted layer's weight, or exit 2 for a layer a GGUF LoRA cannot hold."""
    from lora_cli.adapters.layers import LINEAR

    if layer.kind != LINEAR:
        raise UserInputError(
            f"{run_dir}: the adapter adapts {path} ({type(layer.base_layer).__name__}); a GGUF LoRA holds LoRA on "
            "Linear layers only. Write the merged model with --merged, or train without it (exclude_modules)"
        )
    gname = names.get_name(f"{path}.weight", try_suffixes=(".weight",))
    if gname is None:
        raise UserInputError(f"{run_dir}: the adapted layer {path} has no llama.cpp tensor name; write the merged "
                             "model with --merged, or train without it (exclude_modules)")
    if gname == "output.weight" and getattr(config, "tie_word_embeddings", False):
        raise UserInputError(
            f"{run_dir}: the adapter adapts lm_head, which this base ties to the token embedding: its GGUF has no "
            "separate output tensor to apply it to. Write the merged model with --merged, or train without lm_head"
        )
    return gname


def _write_adapter(path: Path, architecture: str, alpha: float, pairs: list[_Pair], dtype: str, run_name: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(run_name)
    for pair in pairs:
        writer.add_tensor(f"{pair.name}.lora_a", pair.a.numpy().astype(DTYPES[dtype]))
        writer.add_tensor(f"{pair.name}.lora_b", pair.b.numpy().astype(DTYPES[dtype]))
    finish(writer)


def _verify_adapter(path: Path, architecture: str, alpha: float, pairs: list[_Pair], heads: dict[str, int],
                    dtype: str) -> float:
    """Read the file back; every tensor as written; llama.cpp's reading of each pair = the engine's delta."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {
        gguf.Keys.General.TYPE: gguf.GGUFType.ADAPTER, gguf.Keys.General.ARCHITECTURE: architecture,
        gguf.Keys.Adapter.TYPE: "lora",
    }
    for key, want in meta.items():
        got = field_value(reader, key)
        if got != want:
            raise GgufExportError(f"the GGUF file says {key} = {got!r}, expected {want!r}; nothing written")
    if abs(field_value(reader, gguf.Keys.Adapter.LORA_ALPHA) - alpha) > 1e-6 * abs(alpha):
        raise GgufExportError("the GGUF file's adapter.lora.alpha is not the one written; nothing written")
    tensors = {t.name: t for t in reader.tensors}
    want_names = {f"{p.name}.lora_{x}" for p in pairs for x in "ab"}
    if set(tensors) != want_names:
        raise GgufExportError(f"the GGUF file holds {len(tensors)} tensors, not the {len(want_names)} written")
    worst = 0.0
    for pair in pairs:
        a, b = (read_tensor(tensors[f"{pair.name}.lora_{x}"], dtype) for x in "ab")
        for got, want, x in ((a, pair.a, "a"), (b, pair.b, "b")):
            if got.shape != want.shape or not torch.equal(got, want.to(torch_dtype(dtype)).float()):
                raise GgufExportError(f"{pair.name}.lora_{x} reads back different from what was written; nothing written")
        rank = b.shape[1]
        delta = (alpha / rank) * (to_rotary(b, pair.name, heads, inverse=True) @ a)
        scale = float(pair.delta.abs().max())
        err = float((delta - pair.delta).abs().max()) / scale if scale > 0 else float(delta.abs().max())
        if err > DELTA_RTOL[dtype]:
            raise GgufExportError(
                f"{pair.name}: the update llama.cpp would apply differs from the run's adapter by {err:.3g} of its "
                f"largest entry (tolerance {DELTA_RTOL[dtype]:g}); nothing written. Report this as a bug"
            )
        worst = max(worst, err)
    return worst


# ---------------------------------------------------------------------------- merged
def _export_merged(run_dir: Path, out: Path, recipe: Any, dtype: str, n: int, replace: bool) -> GgufExportReport:
    from lora_cli.inference.loading import load_run
    from lora_cli.inference.merge import merge_run, refuse_unmergeable, verification_batch

    refuse_unmergeable(run_dir / rd.ADAPTER_DIR)
    processor_dir = run_dir / rd.PROCESSOR_DIR
    if (processor_dir / "tokenizer.json").is_file():  # told before the slow load; checked again on the merge
        tokenizer_kind(json.loads((processor_dir / "tokenizer.json").read_text(encoding="utf-8")), run_dir)
    loaded = load_run(run_dir, device="cpu")
    config = loaded.model.get_base_model().config
    architecture = check_architecture(getattr(config, "model_type", None), run_dir)
    rope_settings(config, run_dir)  # refused before the merge
    batch, source = verification_batch(loaded, n)
    with atomic_dir(out, replace=replace) as staging:
        merged_dir = staging / ".merged"
        merge_report = merge_run(loaded.model, loaded.processor, merged_dir, dtype=dtype, verify_batch=batch, n=n,
                                 source=source, run_dir=run_dir)
        path = staging / MODEL_FILE
        written = write_model_gguf(merged_dir, path, dtype, name=recipe.name)
        shutil.rmtree(merged_dir)
        merge_report.out_dir = str(out)
        report = GgufExportReport(
            str(out), "merged", MODEL_FILE, architecture, dtype, written["tensors"], path.stat().st_size,
            sha256(path), ["merge verified on logits as `loracli merge` does",
                            "read back with gguf.GGUFReader: every tensor (rotary order undone) equals the merged "
                            "weight; the token list is the tokenizer's"],
            written["max_abs_diff"], tokenizer=written["tokenizer"], merge=merge_report.to_dict(),
            inputs=merge_report.inputs,
        )
        rd.write_json(staging / REPORT_FILE, report.to_dict())
    return report
