"""`loracli tune`: hyperparameter search with Optuna, every trial an ordinary run directory.

    study = tune("recipes/quickstart.yaml", trials=20, out="runs/quickstart-tune", metric="eval_accuracy",
                 space=["adapter.r=int(4,64,log)", "adapter.method=cat(lora,loha,lokr)"])

The search folder:

    <out>/study.db          Optuna's SQLite storage: a killed search continues with the same --out
    <out>/tune.json         recipe, space, metric and direction; a different search is refused there
    <out>/trial-0000/ ...   one run directory per trial, trained by the normal pipeline
    <out>/results.csv       one row per trial: state, parameters, value, run directory
    <out>/param_importances.png   Optuna's importance figure (from 2 completed trials on)
    <out>/best_recipe.yaml  the recipe with the best trial's values: `loracli train` runs it

Each trial trains through :func:`lora_cli.training.pipeline.run_training` with its sampled
values as overrides. :class:`PruningCallback` reports every evaluation to Optuna and stops
a trial the pruner gives up on; the run still ends as a complete run directory, and the
trial is then recorded as pruned (``optuna.TrialPruned``). A search space item is
``key=int(low,high[,log])``, ``key=float(low,high[,log])`` or ``key=cat(a,b,...)``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lora_cli import rundir as rd
from lora_cli.adapters import available_methods
from lora_cli.atomic import atomic_file, write_text
from lora_cli.errors import LoraCliError, UserInputError, did_you_mean
from lora_cli.recipe import RecipeError, checks, load_recipe
from lora_cli.recipe.adapter import carry_options, written_options
from lora_cli.recipe.checks import article
from lora_cli.recipe.yamlio import parse_value
from lora_cli.safe_text import csv_cell
from lora_cli.task_kinds import TASK_KINDS, TIMING_METRICS
from lora_cli.training.pipeline import run_training
from lora_cli.training.preflight import protected_paths

SPACE_HINT = ("write key=int(low,high[,log]), key=float(low,high[,log]) or key=cat(a,b,...), e.g. "
              "--space 'adapter.r=int(4,64,log)' --space 'training.learning_rate=float(1e-4,1e-2,log)'")
_ITEM = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*(int|float|cat)\s*\((.*)\)\s*$")
# options one method names differently from another (PEFT's names)
STUDY_FILE, SETTINGS_FILE, RESULTS_FILE = "study.db", "tune.json", "results.csv"
IMPORTANCE_FILE, BEST_FILE = "param_importances.png", "best_recipe.yaml"


@dataclass
class TuneResult:
    study: Any  # optuna.Study
    out: Path
    written: list[Path]


@dataclass(frozen=True)
class Param:
    key: str
    kind: str  # int, float or cat
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)
        return trial.suggest_categorical(self.key, list(self.choices))


def parse_space(item: str) -> Param:
    """One ``--space`` item; a UserInputError naming it and the fix when it is malformed."""
    def bad(why: str) -> UserInputError:
        return UserInputError(f"--space {item!r}: {why}; {SPACE_HINT}")

    match = _ITEM.match(item)
    if not match:
        raise bad("is not of the form key=kind(...)")
    key, kind, body = match.groups()
    if any(not part for part in key.split(".")):
        raise bad("has an empty key part")
    args = [a.strip() for a in body.split(",")]
    if kind == "cat":
        if not args or any(not a for a in args):
            raise bad("cat() needs one or more comma-separated choices")
        choices = tuple(parse_value(a) for a in args)
        if any(not isinstance(c, (str, int, float, bool)) for c in choices) or len(set(choices)) != len(choices):
            raise bad("cat() choices must be distinct plain values")
        return Param(key, kind, choices=choices)
    log = len(args) == 3 and args[2] == "log"
    if len(args) not in (2, 3) or (len(args) == 3 and not log):
        raise bad(f"{kind}() takes low,high or low,high,log")
    try:
        low, high = (_whole(a) if kind == "int" else float(a) for a in args[:2])
    except ValueError:
        raise bad(f"{kind}() bounds must be {'whole numbers' if kind == 'int' else 'numbers'}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise bad(f"the low bound must be below the high bound (got {low} and {high})")
    if log and low <= 0:
        raise bad("a log scale needs a low bound above 0")
    return Param(key, kind, low, high, log)


LOWER_IS_BETTER = ("loss", *checks.LOWER_IS_BETTER)


def check_metric(task: str, metric: str) -> str:
    """The name (without ``eval_``) of the metric ``--metric`` picks for a ``task`` run, from what its
    evaluations report (task_kinds: during training, and at the end); a UserInputError listing them."""
    kind = TASK_KINDS[task]
    name = metric.removeprefix("eval_")
    if name in (*kind.metrics, *kind.final_metrics, *TIMING_METRICS):
        return name
    during = ", ".join(f"eval_{m}" for m in kind.metrics)
    final = ", ".join(f"eval_{m}" for m in kind.final_metrics)
    hint = did_you_mean(name, (*kind.metrics, *kind.final_metrics), prefix="eval_")
    raise UserInputError(f"--metric {metric}: {article(task)} run reports {during} (during training)"
                         + (f" and {final} (at the end)" if final else "") + f"; {hint or 'pick one of them'}")


def _check_search(recipe: Any, metric: str, direction: str, pruner: Any) -> None:
    """--metric checked against the task; warnings, before trial 1, for a search that would run but not as meant."""
    kind = TASK_KINDS[recipe.task]
    name = check_metric(recipe.task, metric)
    if name in LOWER_IS_BETTER and direction == "maximize":
        warnings.warn(f"--metric {metric} is better when lower, but --direction is maximize: the search will look "
                      "for the worst trials; pass --direction minimize", stacklevel=3)
    strategy = recipe.training.get("eval_strategy", "no")
    strategy = str(getattr(strategy, "value", strategy))
    if pruner is not False and strategy == "no":
        warnings.warn("training.eval_strategy is 'no': the pruner reads the evaluations during training, so no trial "
                      "will be stopped early; set eval_strategy: steps (or epoch) to prune", stacklevel=3)
    elif pruner is not False and name in kind.final_metrics:
        warnings.warn(f"--metric {metric} is computed only at the end of a trial, so the pruner cannot stop a trial "
                      f"early; pick one of {', '.join(kind.metrics)} to prune", stacklevel=3)


def _whole(text: str) -> int:
    """An int() bound: ``64``, or a whole number in float notation such as ``1e3``."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise ValueError(text) from None
        return int(value)


def check_bounds(recipe_path: Path, recipe: Any, space: list[str], params: list[Param], out: Path,
                 overrides: Sequence[str] = ()) -> None:
    """Every bound and choice of the space must make a valid recipe (ranks and sizes within the
    engine's limits included) with the search's fixed ``overrides``: a UserInputError naming the
    --space item, before the first trial."""
    for item, param in zip(space, params, strict=True):
        for value in (param.choices or (param.low, param.high)):
            v = int(value) if param.kind == "int" else value
            try:
                load_recipe(recipe_path, list(overrides) + trial_overrides(recipe, {param.key: v})
                            + [f"output_dir={out / 'check'}"])
            except RecipeError as exc:
                problems = "; ".join(p.render().split(": ", 1)[-1] for p in exc.problems)
                raise UserInputError(f"--space {item!r}: the value {v!r} makes an invalid recipe ({problems}); "
                                     "narrow the range") from None


def trial_overrides(recipe: Any, values: dict[str, Any]) -> list[str]:
    """The overrides that train ``values`` (key -> sampled value) on ``recipe``.

    A sampled ``adapter.method`` replaces the whole adapter section: the other methods name
    some options differently (``lora_alpha`` / ``alpha``) or lack them; those are renamed or
    left at the new method's defaults.
    """
    method = values.get("adapter.method", recipe.adapter.method)
    if method == recipe.adapter.method:
        return [f"{k}={json.dumps(v)}" for k, v in values.items()]
    if method not in available_methods():
        raise UserInputError(f"--space adapter.method: {method!r} is not a method; choose from "
                             f"{', '.join(available_methods())}")
    given = {key for key in values if key.startswith("adapter.")}
    carried, _ = carry_options(written_options(recipe.adapter), method, given)
    section: dict[str, Any] = {"method": method, **carried}
    for key, value in values.items():
        if key.startswith("adapter.") and key != "adapter.method":
            section[key.split(".", 1)[1]] = value
    rest = [f"{k}={json.dumps(v)}" for k, v in values.items() if not k.startswith("adapter.")]
    return [f"adapter={json.dumps(section)}", *rest]


class PruningCallback(TrainerCallback):
    """Report each evaluation's metric to the Optuna trial; stop the run when it should be pruned."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric, self.pruned, self.reported = trial, metric, False, 0
        self.steps: set[int] = set()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = metric_value(metrics or {}, self.metric)
        if value is None or state.global_step in self.steps:  # the final evaluate() repeats the last step
            return control
        self.steps.add(state.global_step)
        self.trial.report(value, step=state.global_step)
        self.reported += 1
        if self.trial.should_prune():
            self.pruned = True
            control.should_training_stop = True
        return control


def metric_value(metrics: dict[str, Any], metric: str) -> float | None:
    for key in (metric, f"eval_{metric}", metric.removeprefix("eval_")):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _final_metrics(run_dir: Path) -> dict[str, Any]:
    try:
        report = json.loads((run_dir / rd.EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {**report, **report.get("trainer", {})} if isinstance(report, dict) else {}


def _check_out(out: Path, settings: dict[str, Any], recipe: Any, recipe_path: Path) -> None:
    """The folder rule (:mod:`lora_cli.rundir.guard`): new, empty, or the same search's folder."""
    rd.check_output_dir(out, rd.Output("--out", "tune", SETTINGS_FILE, f"{recipe.output_path}-tune-2"),
                        reads=protected_paths(recipe, recipe_path), update=True)
    saved_file = out / SETTINGS_FILE
    if saved_file.is_file():
        try:
            saved = json.loads(saved_file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise UserInputError(f"--out {out}: {SETTINGS_FILE} cannot be read ({exc}); pick a new --out") from None
        if saved != settings:
            changed = ", ".join(k for k in settings if not isinstance(saved, dict) or saved.get(k) != settings[k])
            raise UserInputError(f"--out {out} holds another search ({changed} differ); repeat its arguments to "
                                 "continue it, or pick a new --out")


def tune(recipe_path: str | Path, space: list[str], trials: int, metric: str, direction: str = "maximize",
         out: str | Path | None = None, pruner: Any = None, on_trial: Any = None,
         overrides: Sequence[str] = ()) -> TuneResult:
    """Run (or continue) the search until ``trials`` trials have finished. ``on_trial(event,
    trial, values)`` hears "start" (an optuna Trial, its sampled values) and "end" (the finished
    FrozenTrial), for a caller that says how the search goes. ``overrides`` (``a.b=value``, as
    ``train`` takes them) hold for every trial; a --space key wins over an override of the same key."""
    if importlib.util.find_spec("optuna") is None:
        raise UserInputError("loracli tune needs Optuna: pip install 'loracli[tune]'")
    import optuna

    recipe_path = Path(recipe_path)
    params = [parse_space(s) for s in space]
    if not params:
        raise UserInputError(f"tune needs at least one --space; {SPACE_HINT}")
    dupes = {p.key for p in params if [q.key for q in params].count(p.key) > 1}
    if dupes:
        raise UserInputError(f"--space names {', '.join(sorted(dupes))} more than once; give each key one range")
    if direction not in ("maximize", "minimize"):
        raise UserInputError(f"--direction {direction!r}: choose maximize or minimize")
    if trials < 1:
        raise UserInputError(f"--trials must be at least 1, got {trials}")
    fixed = list(overrides)
    recipe = load_recipe(recipe_path, fixed)
    check_metric(recipe.task, metric)  # before anything trains
    out = Path(out) if out is not None else Path(f"{recipe.output_path}-tune")
    # every bound must make a valid recipe: before the first trial
    check_bounds(recipe_path, recipe, space, params, out, fixed)
    settings = {"recipe": str(recipe_path.resolve()), "space": space, "metric": metric, "direction": direction}
    if fixed:  # a search continued with other overrides would mix two experiments
        settings["overrides"] = fixed
    _check_out(out, settings, recipe, recipe_path)
    _check_search(recipe, metric, direction, pruner)
    out.mkdir(parents=True, exist_ok=True)
    with rd.RunLock(out, hint="or give this search another --out"):  # one search at a time in a folder
        rd.write_json(out / SETTINGS_FILE, settings)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name="loracli-tune", storage=f"sqlite:///{(out / STUDY_FILE).resolve()}", load_if_exists=True,
            direction=direction, sampler=optuna.samplers.TPESampler(seed=recipe.seed),
            pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=2))
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # a killed search's trial
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        remaining = trials - len(study.get_trials(deepcopy=False, states=done))

        def objective(trial):
            values = {p.key: p.suggest(trial) for p in params}
            run_dir = out / f"trial-{trial.number:04d}"
            trial.set_user_attr("run_dir", str(run_dir))
            if on_trial is not None:
                on_trial("start", trial, values)
            callback = PruningCallback(trial, metric)
            try:
                run_training(recipe_path, fixed + trial_overrides(recipe, values) + [f"output_dir={run_dir}"],
                             extra_callbacks=[callback])
            except UserInputError:
                raise
            except LoraCliError as exc:  # e.g. a NaN loss at these values: this trial fails, the search goes on
                trial.set_user_attr("error", str(exc)[:500])
                warnings.warn(f"trial {trial.number} ({run_dir}) failed: {exc}", stacklevel=2)
                return float("nan")
            final = _final_metrics(run_dir)
            value = metric_value(final, metric)
            if value is None:
                names = ", ".join(sorted(k for k, v in final.items() if isinstance(v, (int, float))))
                raise UserInputError(f"--metric {metric}: trial {trial.number} ({run_dir}) reported no such metric; "
                                     f"it reported {names or 'none'}. Pick one of them")
            if callback.pruned:
                raise optuna.TrialPruned(f"stopped after {callback.reported} evaluation(s)")
            return value

        if remaining > 0:
            ended = [lambda _, frozen: on_trial("end", frozen, frozen.params)] if on_trial is not None else None
            study.optimize(objective, n_trials=remaining, catch=(), gc_after_trial=True, callbacks=ended)
        written = [write_results(study, params, out), write_importance(study, out),
                   write_best_recipe(study, recipe, recipe_path, out, fixed)]
    return TuneResult(study, out, [p for p in written if p is not None])


def write_results(study: Any, params: list[Param], out: Path) -> Path:
    path = out / RESULTS_FILE
    with atomic_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "state", *[csv_cell(p.key) for p in params], "value", "run_dir"])
        for t in study.trials:  # cat() choices and folder names are user text: spreadsheet-safe cells
            values = [t.params.get(p.key, "") for p in params]
            writer.writerow([t.number, t.state.name.lower(), *[v if isinstance(v, (int, float)) else csv_cell(v)
                                                               for v in values],
                             "" if t.value is None else t.value, csv_cell(t.user_attrs.get("run_dir", ""))])
    return path


def write_importance(study: Any, out: Path) -> Path | None:
    """Optuna's parameter-importance figure; None (and a warning) below two completed trials."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        warnings.warn(f"{len(complete)} completed trial(s): the importance figure needs at least 2, so "
                      f"{out / IMPORTANCE_FILE} is not drawn; run more --trials with the same --out", stacklevel=2)
        return None
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization.matplotlib import plot_param_importances

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib figures experimental
            axes = plot_param_importances(study)
        with atomic_file(out / IMPORTANCE_FILE) as tmp:
            axes.figure.savefig(tmp, dpi=120, bbox_inches="tight")
        matplotlib.pyplot.close(axes.figure)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. every trial sampled the same values
        warnings.warn(f"could not compute parameter importances ({exc}); {out / IMPORTANCE_FILE} is not drawn",
                      stacklevel=2)
        return None
    return out / IMPORTANCE_FILE


def write_best_recipe(study: Any, recipe: Any, recipe_path: Path, out: Path, fixed: Sequence[str] = ()) -> Path | None:
    """The recipe with the best trial's values applied, as YAML ``loracli train`` reads."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    overrides = [*fixed, *trial_overrides(recipe, best.params), f"output_dir={recipe.output_path}-best"]
    text = load_recipe(recipe_path, overrides).to_yaml()
    head = f"# Best of {len(study.trials)} trial(s): trial {best.number}, {study.direction.name.lower()}d value {best.value}\n"
    path = write_text(out / BEST_FILE, head + text)
    load_recipe(path)  # it must train as written
    return path
