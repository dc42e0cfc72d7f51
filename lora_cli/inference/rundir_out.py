"""Writing a new run directory from existing runs (`combine`, `convert`): checks and copying.

The new run holds what :func:`lora_cli.inference.loading.load_run` reads, taken from the
first source run: ``recipe.yaml`` (rewritten for the new adapter), ``processor/``,
``base_model/`` when the base was built from a config, the label map beside the new
``adapter/``, plus a fresh ``env.json`` and ``status.json`` and a provenance JSON file.
It is built in a temporary sibling and swapped in whole (:func:`lora_cli.atomic.atomic_dir`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lora_cli import rundir as rd
from lora_cli.recipe import dump_recipe_dict, load_recipe
from lora_cli.recipe.yamlio import dump


def check_new_run_dir(out: Path, sources: list[Path], overwrite: bool, verb: str, marker: str,
                      flag: str = "--out") -> bool:
    """Refuse an output folder that would destroy data, before any work is done (the folder
    rule of :mod:`lora_cli.rundir.guard`): ``overwrite`` replaces only a run this verb wrote
    (its provenance file ``marker``). True when ``out`` is such a run, to be replaced."""
    example = "runs/combined" if verb == "combine" else "runs/converted"
    return rd.check_output_dir(out, rd.Output(flag, verb, marker, example, is_run=True), reads=sources,
                               replace=overwrite, replace_flag="--overwrite")


def recipe_adapter(recipe: Any, updates: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``adapter:`` section with ``updates`` applied (a None value removes the key)."""
    section = dump_recipe_dict(recipe)["adapter"]
    for key, value in updates.items():
        if value is None:
            section.pop(key, None)
        else:
            section[key] = value
    return section


def write_run_files(staging: Path, first: Path, recipe: Any, out: Path, adapter: dict[str, Any],
                    provenance_file: str, provenance: dict[str, Any]) -> None:
    """Fill ``staging`` (the future ``out``) with everything but ``adapter/``'s weights and config.

    ``recipe``: the first source run's Recipe; its name and output_dir are updated, its
    ``adapter:`` section replaced by ``adapter`` (see :func:`recipe_adapter`), and the result
    read back with :func:`load_recipe`, so the new run's recipe is known to be valid.
    """
    data = dump_recipe_dict(recipe)
    data["output_dir"] = str(out)
    data["name"] = out.name if _plain_name(out.name) else data["name"]
    data["adapter"] = adapter
    recipe_file = staging / rd.RECIPE_FILE
    recipe_file.write_text(f"# Written by loracli from {first}\n" + dump(data), encoding="utf-8")
    load_recipe(recipe_file)  # the verbs will read it: it must validate now
    for folder in (rd.PROCESSOR_DIR, rd.BASE_MODEL_DIR):
        if (first / folder).is_dir():
            shutil.copytree(first / folder, staging / folder, symlinks=False)
    labels = rd.read_label_map(first / rd.ADAPTER_DIR)
    if labels is not None:
        rd.save_label_map(staging / rd.ADAPTER_DIR, labels)
    rd.write_json(staging / rd.ENV_FILE, rd.environment(recipe.seed))
    rd.write_json(staging / provenance_file, provenance)
    rd.write_status(staging, "completed", error=None, made_by=provenance.get("verb"))


def _plain_name(name: str) -> bool:
    return bool(name.strip()) and name[0] not in ".-" and len(name) <= 100 and name.isprintable()
