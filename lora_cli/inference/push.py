"""Publish a run on the Hugging Face Hub: build the repository folder, then upload it whole.

    folder = build_push_folder("runs/food101-lora", "me/food101-lora", staging)
    push_run("runs/food101-lora", "me/food101-lora", private=True)       # create_repo + upload_folder
    push_run("runs/food101-lora", "me/food101-lora", dry_run="to-push/") # the same folder, nothing remote

The folder, in PEFT's layout so ``PeftModel.from_pretrained(base, "me/food101-lora")`` loads it:

    README.md                 model card (lora_cli.inference.model_card), YAML metadata first
    adapter_config.json       \\ the run's adapter/ folder (with --merged: the verified merged
    adapter_model.safetensors /  model, config.json + model.safetensors, instead)
    label_map.json            classifiers: the class names
    <processor files>         image processor or tokenizer
    base_model/               only when the base was built from a config (random weights nobody can download)
    recipe.yaml, eval.json    the resolved recipe and the final evaluation
    plots/*.png               the training figures

Everything is checked before anything remote happens: the run, the repo id, that the Hub is
reachable (offline mode or no network fails within seconds) and that a token is there.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lora_cli import rundir as rd
from lora_cli.atomic import atomic_dir, write_text
from lora_cli.errors import LoraCliError, UserInputError
from lora_cli.hub import hub_reachable, offline_by_env
from lora_cli.inference.merge import MERGE_FILE, merge_from_run
from lora_cli.inference.model_card import hub_id, model_card, validate_card
from lora_cli.recipe import load_recipe

CARD_FILE = "README.md"


def check_repo_id(repo_id: str, flag: str = "REPO_ID") -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserInputError(f"{flag} {repo_id!r} is not a Hub repository id ({exc}); write it as user/name, "
                             "e.g. me/food101-lora") from None
    return repo_id


def check_dry_run_dir(folder: Path, run_dir: Path) -> None:
    """--dry-run writes a new folder (the folder rule of :mod:`lora_cli.rundir.guard`; it never replaces one)."""
    rd.check_output_dir(folder, rd.Output("--dry-run", "push", None, "to-push/"), reads=[run_dir], replace_flag=None)


def build_push_folder(run_dir: str | Path, repo_id: str, folder: Path, merged: bool = False,
                      base_model: str | None = None) -> Path:
    """Fill ``folder`` (empty) with what ``push`` uploads for ``run_dir``."""
    run_dir = Path(run_dir)
    recipe_file = run_dir / rd.RECIPE_FILE
    adapter = run_dir / rd.ADAPTER_DIR
    if not recipe_file.is_file() or not (adapter / "adapter_config.json").is_file():
        raise UserInputError(f"{run_dir} is not a finished run (no {rd.RECIPE_FILE} or {rd.ADAPTER_DIR}/"
                             "adapter_config.json); pass the folder `loracli train` wrote, once it has finished")
    rd.check_run_links(run_dir, (*rd.MODEL_PARTS, rd.EVAL_FILE, rd.PLOTS_DIR))  # nothing from outside is published
    recipe = load_recipe(recipe_file)
    base_model = check_repo_id(base_model, "--base-model") if base_model else hub_id(recipe.model.name_or_path)
    report = _read_eval(run_dir)
    if merged:
        merge_from_run(run_dir, folder / ".merged", dtype="float32")
        (folder / ".merged" / MERGE_FILE).unlink()  # the merge's own marker: not part of the repository
        for item in (folder / ".merged").iterdir():
            shutil.move(str(item), folder / item.name)
        (folder / ".merged").rmdir()
        labels = rd.read_label_map(adapter)
        if labels is not None:
            rd.save_label_map(folder, labels)
    else:
        for item in sorted(adapter.iterdir()):
            if item.is_file():  # a link here stays inside the run (check_run_links)
                shutil.copy2(item, folder / item.name)
        for name in (rd.PROCESSOR_DIR, rd.BASE_MODEL_DIR):
            source = run_dir / name
            if name == rd.PROCESSOR_DIR and source.is_dir():
                for item in sorted(source.iterdir()):
                    if item.is_file() and not (folder / item.name).exists():
                        shutil.copy2(item, folder / item.name)
            elif source.is_dir():
                shutil.copytree(source, folder / name, symlinks=False)
    shutil.copy2(recipe_file, folder / rd.RECIPE_FILE)
    if (run_dir / rd.EVAL_FILE).is_file():
        shutil.copy2(run_dir / rd.EVAL_FILE, folder / rd.EVAL_FILE)
    plots = sorted(p.name for p in (run_dir / rd.PLOTS_DIR).glob("*.png") if p.is_file()) \
        if (run_dir / rd.PLOTS_DIR).is_dir() else []
    if plots:
        (folder / rd.PLOTS_DIR).mkdir()
        for name in plots:
            shutil.copy2(run_dir / rd.PLOTS_DIR / name, folder / rd.PLOTS_DIR / name)
    card = model_card(recipe, report, repo_id, plots, merged=merged, base_model=base_model,
                      trainable=_trainable(run_dir))
    try:
        validate_card(card)
    except ValueError as exc:  # our own card: a bug, never the user's input
        raise LoraCliError(f"the generated model card does not validate ({exc}); nothing written or sent. "
                           "Please report this as a bug") from exc
    write_text(folder / CARD_FILE, card)
    return folder


def _read_eval(run_dir: Path) -> dict[str, Any]:
    path = run_dir / rd.EVAL_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise UserInputError(f"{path} is not valid JSON ({exc}); run `loracli eval {run_dir}` to write it again") from None
    return data if isinstance(data, dict) else {}


def _trainable(run_dir: Path) -> str | None:
    """"N adapter parameters (X MB)": what the adapter file holds (adapted layers and trained heads)."""
    path = run_dir / rd.ADAPTER_DIR / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        count = sum(_numel(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
    return f"{count:,d} adapter parameters ({path.stat().st_size / 1e6:.2f} MB)"


def _numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def require_hub_access() -> str:
    """The token to push with; fails fast (seconds) when the Hub cannot be reached or nobody is logged in."""
    if offline_by_env():
        raise UserInputError("cannot push: offline mode is set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), so "
                             "nothing was sent. Unset it to push, or write the folder with --dry-run DIR")
    if not hub_reachable():
        raise UserInputError("cannot push: the Hugging Face Hub is unreachable from this machine (one connect "
                             "attempt timed out or was refused), so nothing was sent. Check the network or "
                             "HF_ENDPOINT, or write the folder with --dry-run DIR")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserInputError("cannot push: no Hugging Face token. Log in with `hf auth login` or set HF_TOKEN")
    return token


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, merged: bool = False,
             revision: str | None = None, dry_run: str | Path | None = None,
             base_model: str | None = None) -> dict[str, Any]:
    """Upload the run (or, with ``dry_run``, write the folder that would be uploaded there)."""
    run_dir = Path(run_dir)
    check_repo_id(repo_id)
    if dry_run is not None:
        target = Path(dry_run)
        check_dry_run_dir(target, run_dir)
        with atomic_dir(target) as staging:
            build_push_folder(run_dir, repo_id, staging, merged=merged, base_model=base_model)
        return {"dry_run": str(target), "repo_id": repo_id, "files": _listing(target)}
    token = require_hub_access()
    with tempfile.TemporaryDirectory(prefix="loracli-push-") as tmp:
        folder = build_push_folder(run_dir, repo_id, Path(tmp), merged=merged, base_model=base_model)
        files = _listing(folder)
        url = _upload(folder, repo_id, token, private, revision)
    return {"repo_id": repo_id, "url": url, "revision": revision, "files": files}


def _upload(folder: Path, repo_id: str, token: str, private: bool, revision: str | None) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, repo_type="model",
                                 commit_message="Upload from loracli")
    except HfHubHTTPError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise LoraCliError(f"the Hub refused the upload to {repo_id} ({first}); check the token's write access "
                           "and the repository name") from None
    except Exception as exc:  # noqa: BLE001 - the HTTP client's network errors share no base class with OSError
        raise LoraCliError(f"the upload to {repo_id} failed ({type(exc).__name__}: {exc}); check the network and "
                           "try again") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
