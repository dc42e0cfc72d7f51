"""X-LoRA's experts on disk: LoRA adapter folders or loracli runs, checked and found again.

No torch: the config checks its experts with these when a recipe is validated.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lora_cli.adapters.config import CONFIG_NAME, AdapterConfig
from lora_cli.errors import UserInputError

RUN_ADAPTER_DIR = "adapter"
"""A loracli run keeps its adapter here (``lora_cli.rundir.ADAPTER_DIR``; the engine cannot import rundir)."""
EXPERT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def expert_folder(path: str | os.PathLike) -> Path | str:
    """The adapter folder of an expert given as an adapter folder or a loracli run
    directory (its ``adapter/``), or why it is neither (with the fix)."""
    folder = Path(path).expanduser()
    if (folder / CONFIG_NAME).is_file():
        return folder
    if (folder / RUN_ADAPTER_DIR / CONFIG_NAME).is_file():
        return folder / RUN_ADAPTER_DIR
    if not folder.exists():
        return "does not exist; give a LoRA adapter folder or the run directory `loracli train` wrote"
    return (f"is not an adapter folder nor a loracli run (no {CONFIG_NAME} in it or in its {RUN_ADAPTER_DIR}/); "
            "give a LoRA adapter folder or a finished run directory")


def read_expert_config(folder: Path) -> AdapterConfig | str:
    """The expert's LoRA config, or why it cannot be an X-LoRA expert (with the fix)."""
    try:
        config = AdapterConfig.from_pretrained(folder)
    except UserInputError as exc:
        return f"cannot be read ({str(exc).splitlines()[0][:300]})"
    if config.peft_type != "LORA":
        return (f"is a {config.method} adapter ({folder}); X-LoRA mixes LoRA experts only: train the expert with "
                "method: lora, or convert it (loracli convert)")
    if getattr(config, "use_dora", False):
        return f"is a DoRA adapter ({folder}); X-LoRA has no DoRA experts (neither has PEFT): use a plain LoRA expert"
    if config.modules_to_save:
        return (f"trains modules_to_save {config.modules_to_save} ({folder}); X-LoRA mixes LoRA layers only, so "
                "its experts may not carry their own heads: use experts of a causal LM task")
    return config


def resolve_experts(adapters: dict[str, str]) -> dict[str, Path]:
    """{name: adapter folder} of a config's ``adapters``; every problem at once."""
    out, problems = {}, []
    for name, path in adapters.items():
        folder = expert_folder(path)
        if isinstance(folder, str):
            problems.append(f"expert {name!r} ({path}) {folder}")
        else:
            out[name] = folder
    if problems:
        raise UserInputError("X-LoRA adapters: " + "; ".join(problems))
    return out


def saved_experts(config: AdapterConfig, root: Path) -> dict[str, Path]:
    """Where a saved X-LoRA folder's experts are: the path recorded in ``adapters`` (relative to
    the folder, or as given), else a sub-folder named like that path's last part or like the key
    (a folder moved since it was saved). Names: the key, except PEFT's index keys "0", "1", ...
    which take the sub-folder's name."""
    out: dict[str, Path] = {}
    for i, (key, value) in enumerate(config.adapters.items()):
        tried = [root / value, Path(value).expanduser(), root / Path(value).name, root / key]
        found = next((p for p in tried if (p / CONFIG_NAME).is_file()), None)
        if found is None:
            shown = ", ".join(str(p) for p in dict.fromkeys(tried))
            raise UserInputError(
                f"{root / CONFIG_NAME}: expert {key!r} is not at {value} nor in a sub-folder of {root} (looked in "
                f"{shown}); copy the expert's adapter folder there, or fix its path under \"adapters\""
            )
        name = key
        if key == str(i) and EXPERT_NAME.fullmatch(found.name) and found.name not in out:
            name = found.name
        out[name] = found
    return out
