"""The run-directory contract: what `train` writes and every later verb reads.

Both sides import this package (training writes, inference and evaluation read); it
imports nothing of loracli but :mod:`lora_cli.errors`. Rebuilding a trained model from a
run is :func:`lora_cli.inference.loading.load_run`.

    runs/<name>/
      recipe.yaml      the fully resolved recipe
      adapter/         adapter_config.json + adapter_model.safetensors (PEFT), label_map.json
      processor/       image processor or tokenizer
      base_model/      only for models built from model.config (random weights nobody can re-download)
      checkpoints/     Trainer checkpoints for --resume
      metrics.jsonl    one JSON object per log/eval event
      eval.json        final evaluation
      plots/           loss / accuracy curves, confusion matrix
      env.json         versions, seed, git commit
      status.json      running / failed / completed, with the error of a failed run
      init_state.safetensors  only for PiSSA / OLoRA / LoftQ (inits that rewrite base weights): their start, for --resume
      calibration.json, calibration.safetensors  only for EVA / CorDA / LoRA-GA: the calibration pass, for --resume
      .loracli.lock    held (fcntl) by the one process that trains into the folder

Safety rules every writer follows (issue 11, issue 23): ``train`` replaces a folder only
when it is recognisably a run (``recipe.yaml`` and ``env.json``) holding no other run and
neither the working directory nor the recipe or data that the command reads; every other
verb's folder or figure follows the one rule of :mod:`.guard` (``check_output_dir``); one process at a time
trains into a run (:class:`RunLock`, in :mod:`.guard`); checkpoints are written under a temporary name and
renamed when complete, and ``--resume`` takes the newest complete one (:mod:`.checkpoints`).
"""

from lora_cli.rundir.checkpoints import checkpoint_problem, checkpoints, latest_checkpoint
from lora_cli.rundir.guard import (
    MODEL_PARTS,
    Output,
    RunInUseError,
    RunLock,
    beside_run,
    check_output_dir,
    check_output_file,
    check_replaceable,
    check_run_links,
    clear_run_dir,
    find_run_below,
    holds_protected,
    is_run_dir,
)
from lora_cli.rundir.layout import (
    ADAPTER_DIR,
    BASE_MODEL_DIR,
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    ENV_FILE,
    EVAL_FILE,
    INIT_STATE_FILE,
    LABEL_MAP_FILE,
    LOCK_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    PROCESSOR_DIR,
    RECIPE_FILE,
    RUN_ENTRIES,
    STAGING_DIR,
    STATUS_FILE,
    environment,
    read_label_map,
    read_status,
    save_label_map,
    write_json,
    write_status,
)

__all__ = [
    "ADAPTER_DIR", "BASE_MODEL_DIR", "CHECKPOINTS_DIR", "CHECKPOINT_PREFIX", "ENV_FILE",
    "EVAL_FILE", "INIT_STATE_FILE", "LABEL_MAP_FILE", "LOCK_FILE", "METRICS_FILE", "PLOTS_DIR", "PROCESSOR_DIR", "RECIPE_FILE",
    "MODEL_PARTS", "RUN_ENTRIES", "STAGING_DIR", "STATUS_FILE", "Output", "RunInUseError", "RunLock",
    "beside_run", "check_output_dir", "check_output_file", "check_replaceable", "check_run_links", "checkpoint_problem",
    "checkpoints", "clear_run_dir", "environment", "find_run_below", "holds_protected", "is_run_dir",
    "latest_checkpoint", "read_label_map", "read_status", "save_label_map", "write_json", "write_status",
]
