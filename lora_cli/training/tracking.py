"""Experiment trackers: ``training.report_to`` passed on to the Trainer, set up for a run.

The Trainer's own integration callbacks (TensorBoard, MLflow, W&B, Trackio, ...) log the
metrics; this module checks before training that each named tracker can work, points the
local ones into the run directory unless the user's environment says otherwise, and logs
what the Trainer does not: the resolved recipe and the trainable-parameter line.

    runs/<name>/logs/tensorboard/   TensorBoardCallback's event files (TENSORBOARD_LOGGING_DIR)
    runs/<name>/logs/mlflow.db      MLflow store, artifacts in logs/mlartifacts (MLFLOW_TRACKING_URI)
    runs/<name>/logs/wandb/         W&B's offline files (WANDB_DIR)

loracli's own metrics.jsonl, eval.json and plots are written whatever ``report_to`` says.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from transformers import TrainerCallback

from lora_cli.errors import UserInputError
from lora_cli.recipe.errors import Reporter
from lora_cli.recipe.training import missing_trackers, report_to_names

logger = logging.getLogger(__name__)

LOGS_DIR = "logs"
"""Tracker files inside the run directory."""

_DEFAULTED: dict[str, str] = {}
"""Environment variables loracli set itself (for an earlier run in this process)."""


# ----------------------------------------------------------------- before training
def tracking_arguments(recipe) -> dict[str, Any]:
    """TrainingArguments keys for the trackers: ``report_to`` (default ``none``), a run name."""
    training = recipe.training or {}
    names = report_to_names(training.get("report_to"))
    kwargs: dict[str, Any] = {"report_to": names or "none"}
    if names:
        kwargs["run_name"] = training.get("run_name") or recipe.name
        kwargs["project"] = training.get("project") or "loracli"  # Trackio's project (the Trainer's default: huggingface)
    return kwargs


def check_trackers(recipe) -> None:
    """Every tracker in ``training.report_to`` is installed and can log from here, or one
    RecipeError names the recipe line and the fix (before anything is written)."""
    training = recipe.training or {}
    value = training.get("report_to")
    names = report_to_names(value)
    if not names:
        return
    report = Reporter(recipe.adapter.locations, recipe.adapter.source or str(recipe.source))
    path = ("training", "report_to")
    for name, hint in missing_trackers(value):
        report.add(path, f"needs the {name} package, which is not installed", value,
                   f"{hint}, or remove {name} from training.report_to")
    if "wandb" in names and not _wandb_can_log():
        report.add(path, "wandb has no API key here and is not in offline mode", value,
                   "run `wandb login` or set WANDB_API_KEY; or set WANDB_MODE=offline to log into "
                   "<run>/logs/wandb and upload later with `wandb sync`")
    refused = _mlflow_refuses_the_store() if "mlflow" in names else None
    if refused is not None:
        report.add(path, f"MLflow refuses MLFLOW_TRACKING_URI={os.environ['MLFLOW_TRACKING_URI']}, a file store: {refused}",
                   value, "set MLFLOW_TRACKING_URI to a database store (e.g. sqlite:///mlflow.db) or a server, or "
                   "unset it to log into <run>/logs/mlflow.db")
    if "trackio" in names and training.get("trackio_space_id") and _hub_offline():
        report.add(("training", "trackio_space_id"), "syncs to a Hugging Face Space, but HF_HUB_OFFLINE is set",
                   training["trackio_space_id"], "remove training.trackio_space_id to log locally, or go online")
    report.raise_if_any()


def _wandb_can_log() -> bool:
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_DISABLED"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _mlflow_refuses_the_store() -> str | None:
    """MLflow's own reason for refusing the user's MLFLOW_TRACKING_URI, or None.

    MLflow 3 refuses a file store (``file://...`` or a plain path) unless
    MLFLOW_ALLOW_FILE_STORE is set, but only when the Trainer's MLflow callback opens it at the
    first step. Its check runs here on a scratch folder, so nothing of the user's is created."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
    if uri in ("", _DEFAULTED.get("MLFLOW_TRACKING_URI")) or urlparse(uri).scheme not in ("", "file"):
        return None
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # not installed (reported above), or from before the refusal: takes a file store
        return None
    if MLFLOW_ALLOW_FILE_STORE.get():
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.file_store import FileStore

    with tempfile.TemporaryDirectory(prefix="loracli-mlflow-check-") as scratch:
        try:
            FileStore(Path(scratch).as_uri())
        except MlflowException as exc:
            return exc.message
    return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


MLFLOW_ANSWER_SECONDS = 3.0
"""How long an MLflow tracking server gets to answer before training is refused."""


def check_tracking_server(recipe) -> None:
    """``training.report_to: mlflow`` with ``MLFLOW_TRACKING_URI`` naming a server (http/https):
    the server answers within :data:`MLFLOW_ANSWER_SECONDS`, or exit 2 naming the URI. MLflow's
    own client would retry for minutes and then fail the run mid-training."""
    if "mlflow" not in report_to_names((recipe.training or {}).get("report_to")):
        return
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.lower().startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=MLFLOW_ANSWER_SECONDS):
            return
    except urllib.error.HTTPError:
        return  # it answered (an error status still means a server is there)
    except (OSError, ValueError) as exc:  # refused, timed out, no such host, a malformed URI
        why = getattr(exc, "reason", None) or exc
        raise UserInputError(
            f"training.report_to names mlflow, but the MLflow server MLFLOW_TRACKING_URI={uri} does not answer "
            f"({why}; waited {MLFLOW_ANSWER_SECONDS:g} s). Start the server, point MLFLOW_TRACKING_URI at one that "
            "runs (or unset it for a store inside the run), or remove mlflow from training.report_to"
        ) from None


def _env_default(name: str, value: str) -> None:
    """Set ``name`` unless the user set it (a value loracli set for an earlier run is replaced)."""
    if os.environ.get(name) in (None, "", _DEFAULTED.get(name)):
        os.environ[name] = _DEFAULTED[name] = value


# ------------------------------------------------------------- with the Trainer
def configure_trackers(trainer, recipe, run_dir: Path) -> None:
    """Point the Trainer's tracker callbacks into ``run_dir/logs`` (where the user set no
    location) and add the callback that logs the recipe to them."""
    names = set(report_to_names((recipe.training or {}).get("report_to")))
    if not names:
        return
    logs = Path(run_dir) / LOGS_DIR
    trackers = [cb for cb in trainer.callback_handler.callbacks if _kind(cb) is not None]
    for cb in trackers:
        if _kind(cb) == "tensorboard" and not getattr(cb, "logging_dir", None):  # TENSORBOARD_LOGGING_DIR unset
            cb.logging_dir = str(logs / "tensorboard")
    if "mlflow" in names:
        _mlflow_store(logs, recipe.name)
    if "wandb" in names:
        logs.mkdir(parents=True, exist_ok=True)
        _env_default("WANDB_DIR", str(logs))
    trainer.add_callback(RunParamsCallback(recipe, trackers))


def _mlflow_store(logs: Path, name: str) -> None:
    """Without MLFLOW_TRACKING_URI: a SQLite store in the run directory, its artifacts beside it."""
    if os.environ.get("MLFLOW_TRACKING_URI") not in (None, "", _DEFAULTED.get("MLFLOW_TRACKING_URI")):
        return
    from mlflow.tracking import MlflowClient

    logs.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(logs / 'mlflow.db').resolve()}"
    _env_default("MLFLOW_TRACKING_URI", uri)
    _env_default("MLFLOW_EXPERIMENT_NAME", name)
    experiment = os.environ["MLFLOW_EXPERIMENT_NAME"]
    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=(logs / "mlartifacts").resolve().as_uri())


def _kind(callback) -> str | None:
    """Which tracker a Trainer callback is (by class, so absent packages are never imported)."""
    return {
        "TensorBoardCallback": "tensorboard",
        "MLflowCallback": "mlflow",
        "WandbCallback": "wandb",
        "TrackioCallback": "trackio",
    }.get(type(callback).__name__)


def trainable_line(model) -> tuple[str, dict[str, int | float]]:
    """``trainable params: N || all params: M || trainable%: P``, and the same as numbers."""
    trainable, total = model.get_nb_trainable_parameters()
    percent = 100 * trainable / total if total else 0.0
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
    return line, {"trainable_params": trainable, "all_params": total, "trainable_percent": round(percent, 6)}


def flat_recipe(recipe) -> dict[str, Any]:
    """The resolved recipe as ``{"adapter.r": 16, ...}`` (lists and mappings as text)."""
    out: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(sub, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = "null" if value is None else str(value)

    walk(recipe.to_dict(), "")
    return out


class RunParamsCallback(TrainerCallback):
    """At the start of training, logs the resolved recipe and the trainable-parameter line
    to each tracker the Trainer opened. Runs after the trackers' own ``on_train_begin``
    (the Trainer calls its integration callbacks first). A tracker that refuses is a
    warning: the run and loracli's own files matter more than a dashboard."""

    def __init__(self, recipe, trackers) -> None:
        self.recipe_yaml = recipe.to_yaml()
        self.params = flat_recipe(recipe)
        self.trackers = list(trackers)
        self.mlflow_run: tuple[Any, str] | None = None  # (mlflow, run id) while reopened for the final eval

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        line, numbers = trainable_line(model)
        for cb in self.trackers:
            kind = _kind(cb)
            try:
                getattr(self, f"_{kind}")(cb, line, numbers)
            except Exception as exc:  # noqa: BLE001 - a tracker's failure must not cost the run
                warnings.warn(f"could not log the recipe to {kind} ({type(exc).__name__}: {str(exc)[:200]}); "
                              "training goes on, metrics.jsonl has every metric", stacklevel=2)
                logger.debug("tracker %s", kind, exc_info=True)

    def on_train_end(self, args, state, control, **kwargs):
        """MLflowCallback ends its run here, and `train` evaluates once more afterwards: reopen
        the run so those final metrics land in it, not in a new run MLflow would start."""
        for cb in self.trackers:
            run_id = getattr(cb, "_loracli_run_id", None)
            if _kind(cb) == "mlflow" and run_id and state.is_world_process_zero and cb._ml_flow.active_run() is None:
                cb._ml_flow.start_run(run_id=run_id)
                self.mlflow_run = (cb._ml_flow, run_id)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.mlflow_run is not None:  # the final evaluation (on_log has logged it): close the run
            mlflow, run_id = self.mlflow_run
            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run()
            self.mlflow_run = None

    def _tensorboard(self, cb, line: str, numbers: dict) -> None:
        writer = cb.tb_writer
        if writer is None:
            return
        writer.add_text("loracli/recipe", "    " + self.recipe_yaml.replace("\n", "\n    "))  # markdown code block
        writer.add_text("loracli/trainable_parameters", line)
        from torch.utils.tensorboard.summary import hparams

        values = {k: v for k, v in {**self.params, **numbers}.items()}
        metrics = ["train/loss", "eval/loss", "eval/accuracy"]
        file_writer = writer._get_file_writer()  # the run's own folder (add_hparams would open a new one)
        for summary in hparams(values, dict.fromkeys(metrics, 0.0)):
            file_writer.add_summary(summary)
        writer.flush()

    def _mlflow(self, cb, line: str, numbers: dict) -> None:
        mlflow = cb._ml_flow
        if mlflow.active_run() is None:
            return
        if cb._auto_end_run:  # a run the callback started (and ends at on_train_end)
            cb._loracli_run_id = mlflow.active_run().info.run_id
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = {_mlflow_key(f"loracli.{k}"): v for k, v in {**self.params, **numbers}.items()
                  if len(str(v)) <= MAX_PARAM_VAL_LENGTH}
        items = list(params.items())
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            mlflow.log_params(dict(items[start:start + MAX_PARAMS_TAGS_PER_BATCH]))
        mlflow.set_tag("loracli.trainable_parameters", line)
        mlflow.log_text(self.recipe_yaml, "loracli/recipe.yaml")

    def _wandb(self, cb, line: str, numbers: dict) -> None:
        run = getattr(cb._wandb, "run", None)
        if run is not None:
            run.config.update({"loracli": {**self.params, **numbers}}, allow_val_change=True)
            run.summary["loracli/trainable_parameters"] = line

    def _trackio(self, cb, line: str, numbers: dict) -> None:
        cb._trackio.config.update({f"loracli/{k}": v for k, v in {**self.params, **numbers}.items()})


def _mlflow_key(key: str) -> str:
    """MLflow keys take letters, digits, ``_ - . /`` and spaces; recipe keys may hold more."""
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", key)[:250]
