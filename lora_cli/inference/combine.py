"""`loracli combine`: several trained LoRA runs -> one new run directory.

    report = combine_runs(["runs/a", "runs/b"], "runs/ab", weights=[0.7, 0.3], how="ties", density=0.5)

The runs must share the task, the base model (same model section; for models built from a
config, byte-identical ``base_model/`` weights), the label map and the method (LoRA).
Their adapters are loaded onto the first run's base and combined with
:meth:`~lora_cli.adapters.combine.AdapterCombineMixin.add_weighted_adapter`; a head
trained in full (``modules_to_save``) becomes the weighted mean of the runs' heads. The
new run takes the first run's recipe, processor and data, so `eval`, `merge` and
`predict` use it like any run; ``combine.json`` records the sources and options.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_cli import rundir as rd
from lora_cli.adapters import AdapterConfig
from lora_cli.adapters.merge_math import COMBINATION_TYPES
from lora_cli.atomic import atomic_dir
from lora_cli.errors import UserInputError
from lora_cli.inference.loading import load_run
from lora_cli.inference.rundir_out import check_new_run_dir, recipe_adapter, write_run_files
from lora_cli.recipe import load_recipe

PROVENANCE_FILE = "combine.json"
MAX_WEIGHT = 100.0
"""Largest |weight| --weights takes: past it a combination is noise, and far past it float32 overflows."""


@dataclass
class CombineReport:
    out_dir: str
    runs: list[str]
    weights: list[float]
    how: str
    rank: int
    layers: int
    heads_averaged: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        runs = " + ".join(f"{w:g} x {r}" for w, r in zip(self.weights, self.runs))
        heads = f"; heads averaged: {', '.join(self.heads_averaged)}" if self.heads_averaged else ""
        return f"{self.how} of {runs}: rank {self.rank} on {self.layers} layer(s){heads}; run written to {self.out_dir}"


def parse_weights(text: str | None, count: int) -> list[float]:
    """``"0.7,0.3"`` -> [0.7, 0.3]; None -> equal weights summing to 1."""
    if text is None:
        return [1.0 / count] * count
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise UserInputError(f"--weights {text!r}: give one number per run, comma-separated, e.g. --weights 0.7,0.3") from None
    if len(weights) != count:
        raise UserInputError(f"--weights {text!r} has {len(weights)} number(s) for {count} run(s); give one per run")
    if not all(math.isfinite(w) for w in weights):
        raise UserInputError(f"--weights {text!r}: every weight must be a finite number, e.g. --weights 0.7,0.3")
    if not all(abs(w) <= MAX_WEIGHT for w in weights):
        raise UserInputError(
            f"--weights {text!r}: each weight scales a run's change to the model and must lie between "
            f"-{MAX_WEIGHT:g} and {MAX_WEIGHT:g} (useful ones are about -2 to 2), e.g. --weights 0.7,0.3"
        )
    return weights


def combine_runs(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    weights: list[float] | None = None,
    how: str = "svd",
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    overwrite: bool = False,
    device: str | None = None,
) -> CombineReport:
    """Combine the adapters of ``run_dirs`` and write the new run ``out_dir``; nothing is
    written when any check fails."""
    runs = [Path(r) for r in run_dirs]
    out = Path(out_dir)
    if len(runs) < 2:
        raise UserInputError("combine needs two or more run directories, e.g. loracli combine runs/a runs/b --out runs/ab")
    if len({r.resolve() for r in runs}) != len(runs):
        raise UserInputError("the same run is given twice; list each run once (use --weights to weigh one more)")
    weights = [1.0 / len(runs)] * len(runs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(runs):
        raise UserInputError(f"{len(weights)} weight(s) for {len(runs)} run(s); give one per run (--weights 0.7,0.3)")
    if how not in COMBINATION_TYPES:
        raise UserInputError(f"--how {how!r} is unknown; use one of {', '.join(COMBINATION_TYPES)}")
    replace = check_new_run_dir(out, runs, overwrite, "combine", PROVENANCE_FILE)
    recipes = [_check_run(r) for r in runs]
    _check_compatible(runs, recipes)

    loaded = load_run(runs[0], device=device)
    model = loaded.model
    names = ["default"] + [f"run{i}" for i in range(1, len(runs))]
    for name, run in zip(names[1:], runs[1:]):
        model.load_adapter(run / rd.ADAPTER_DIR, name)
    model.add_weighted_adapter(names, weights, "combined", combination_type=how, svd_rank=svd_rank,
                               svd_clamp=svd_clamp, density=density, majority_sign_method=majority_sign_method,
                               combine_modules_to_save=True)
    config = model.peft_config["combined"]
    heads = sorted(p for p, w in model._wrappers() if sum(n in w.modules_to_save for n in names) > 1)
    layers = sum("combined" in layer.r for _, layer in model.adapter_layers())
    report = CombineReport(str(out), [str(r) for r in runs], weights, how, config.r, layers, heads)
    provenance = {"verb": "combine", **report.to_dict(), "density": density, "majority_sign_method": majority_sign_method,
                  "svd_rank": svd_rank, "svd_clamp": svd_clamp}
    updates = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": config.target_modules,
               "rank_pattern": None, "alpha_pattern": None, "init_lora_weights": None}
    with atomic_dir(out, replace=replace) as staging:
        model.save_pretrained(staging / ".adapters", selected_adapters=["combined"])
        (staging / rd.ADAPTER_DIR).mkdir()
        for file in (staging / ".adapters" / "combined").iterdir():
            os.replace(file, staging / rd.ADAPTER_DIR / file.name)
        (staging / ".adapters" / "combined").rmdir()
        (staging / ".adapters").rmdir()
        write_run_files(staging, runs[0], loaded.recipe, out, recipe_adapter(loaded.recipe, updates), PROVENANCE_FILE,
                        provenance)
    return report


def _check_run(run: Path):
    if not (run / rd.RECIPE_FILE).is_file():
        raise UserInputError(f"{run} is not a run directory (no {rd.RECIPE_FILE}); pass folders `loracli train` wrote")
    rd.check_run_links(run)  # its recipe, adapter and base_model/ are read: never through a link out of it
    if not (run / rd.ADAPTER_DIR / "adapter_config.json").is_file():
        raise UserInputError(f"{run}: no adapter in {run / rd.ADAPTER_DIR}; did its training finish?")
    return load_recipe(run / rd.RECIPE_FILE)


def _check_compatible(runs: list[Path], recipes: list[Any]) -> None:
    """Same task, base model, label map and method as the first run, or a UserInputError naming the difference."""
    first, first_recipe = runs[0], recipes[0]
    first_config = AdapterConfig.from_pretrained(first / rd.ADAPTER_DIR)
    first_labels = rd.read_label_map(first / rd.ADAPTER_DIR)
    first_base = _base_digest(first)
    for run, recipe in zip(runs[1:], recipes[1:]):
        config = AdapterConfig.from_pretrained(run / rd.ADAPTER_DIR)
        checks = [
            ("task", first_recipe.task, recipe.task),
            ("adapter method", first_config.method, config.method),
            ("base model (recipe model section)", first_recipe.model.model_dump(), recipe.model.model_dump()),
            ("label map (adapter/label_map.json)", first_labels, rd.read_label_map(run / rd.ADAPTER_DIR)),
            ("base model weights (base_model/)", first_base, _base_digest(run)),
        ]
        for what, mine, theirs in checks:
            if mine != theirs:
                shown = (f": {mine!r} vs {theirs!r}" if len(repr(mine)) + len(repr(theirs)) < 200 else "")
                raise UserInputError(
                    f"{run} cannot be combined with {first}: they differ in {what}{shown}. Combine only runs "
                    "trained from the same base model on the same task and classes with the same method"
                )


def _base_digest(run: Path) -> dict[str, str] | None:
    """sha256 of each weights file in ``base_model/`` (None without the folder)."""
    folder = run / rd.BASE_MODEL_DIR
    if not folder.is_dir():
        return None
    digests = {}
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        sha = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                sha.update(block)
        digests[file.name] = sha.hexdigest()
    return digests
