"""`loracli convert`: a LoHa / LoKr run -> a new run whose adapter is plain LoRA.

    report = convert_run("runs/food-loha", "runs/food-lora", energy=0.99)
    report.max_error            # largest per-layer ||ΔW - B A||_F / ||ΔW||_F

The math and the exact error are in :mod:`lora_cli.adapters.convert`. The new run takes
the source run's recipe (its ``adapter:`` section now the LoRA one), processor, base model
folder and label map, so `eval`, `merge` and `predict` take it like any run, and its
``adapter/`` loads in ``peft.PeftModel.from_pretrained``. ``convert.json`` records the
source and every layer's rank and error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_cli import rundir as rd
from lora_cli.adapters import AdapterConfig, ConversionReport, save_as_lora
from lora_cli.adapters.convert import CONVERTIBLE, check_choice
from lora_cli.atomic import atomic_dir
from lora_cli.errors import UserInputError
from lora_cli.inference.loading import load_run
from lora_cli.inference.rundir_out import check_new_run_dir, write_run_files

PROVENANCE_FILE = "convert.json"
TARGETS = ("lora",)


@dataclass
class ConvertReport:
    out_dir: str
    source: str
    method: str
    conversion: ConversionReport

    @property
    def max_error(self) -> float:
        return self.conversion.max_error

    def describe(self) -> str:
        ranks = sorted({layer.rank for layer in self.conversion.layers})
        shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
        worst = self.conversion.worst
        return (
            f"{self.method} -> LoRA on {len(self.conversion.layers)} layer(s), rank {shown}: max relative error "
            f"{self.max_error:.3g} ({worst.path}); run written to {self.out_dir}"
        )


def convert_run(run_dir: str | Path, out_dir: str | Path, to: str = "lora", rank: int | None = None,
                energy: float | None = None, overwrite: bool = False, device: str | None = None) -> ConvertReport:
    """Convert the run's LoHa / LoKr adapter to LoRA and write the new run ``out_dir``."""
    run, out = Path(run_dir), Path(out_dir)
    if to not in TARGETS:
        raise UserInputError(f"--to {to!r}: adapters convert to {', '.join(TARGETS)} only")
    check_choice(rank, energy)
    replace = check_new_run_dir(out, [run], overwrite, "convert", PROVENANCE_FILE)
    loaded = load_run(run, device=device)
    method = loaded.model.peft_config["default"].method
    if method not in CONVERTIBLE:
        raise UserInputError(
            f"{run} holds a {method} adapter; convert takes LoHa or LoKr runs"
            + (" (this one is LoRA already: use it as it is)" if method == "lora" else "")
        )
    with atomic_dir(out, replace=replace) as staging:
        conversion = save_as_lora(loaded.model, staging / rd.ADAPTER_DIR, rank=rank, energy=energy)
        config = loaded.model.peft_config["default"]
        written = AdapterConfig.from_pretrained(staging / rd.ADAPTER_DIR)  # what the new run will load
        adapter = {"method": "lora", "r": written.r, "lora_alpha": written.lora_alpha,
                   "target_modules": written.target_modules}
        for key in ("rank_pattern", "alpha_pattern"):
            if getattr(written, key):
                adapter[key] = getattr(written, key)
        if config.modules_to_save:
            adapter["modules_to_save"] = list(config.modules_to_save)
        report = ConvertReport(str(out), str(run), method, conversion)
        provenance = {"verb": "convert", "source": str(run), "from": method, "to": "lora", "rank": rank,
                      "energy": energy, **conversion.to_dict()}
        write_run_files(staging, run, loaded.recipe, out, adapter, PROVENANCE_FILE, provenance)
    return report
