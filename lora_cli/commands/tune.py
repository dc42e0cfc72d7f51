"""`loracli tune`: hyperparameter search with Optuna over a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lora_cli.commands.args import RecipeArg
from lora_cli.commands.output import err, shown


def tune(
    recipe: RecipeArg,
    space: Annotated[
        list[str],
        typer.Option("--space", help="key=int(low,high[,log]), key=float(low,high[,log]) or key=cat(a,b,...); repeat.",
                     show_default=False),
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Overrides a.b.c=value (YAML-typed) for every trial, as `train` takes them, e.g. "
                       "training.max_steps=50; ~a.b.c removes a key.", show_default=False),
    ] = None,
    trials: Annotated[int, typer.Option("--trials", help="Finished trials the search ends with (a resumed search counts earlier ones).")] = 10,
    metric: Annotated[str, typer.Option("--metric", help="Evaluation metric to optimise, e.g. eval_accuracy "
                                                            "(eval_perplexity for causal-lm, eval_bleu for seq2seq); checked "
                                                            "against what the task reports before trial 1.")] = "eval_accuracy",
    direction: Annotated[str, typer.Option("--direction", help="maximize or minimize.")] = "maximize",
    out: Annotated[
        Path | None, typer.Option("--out", help="Search folder (default: the recipe's output_dir + -tune); the same --out continues a search.", show_default=False)
    ] = None,
) -> None:
    """Search hyperparameters with Optuna: each trial is a run directory, weak trials are pruned, the study resumes.

    Ends with a results table, results.csv, param_importances.png and best_recipe.yaml in the search folder.

    Example: loracli tune recipes/quickstart.yaml training.max_steps=50 --trials 20 --space 'adapter.r=int(4,64,log)' --space 'training.learning_rate=float(1e-4,1e-2,log)' --space 'adapter.method=cat(lora,loha,lokr)' --metric eval_accuracy
    """
    from lora_cli.training.tune import parse_space
    from lora_cli.training.tune import tune as run_tune

    result = run_tune(recipe, space, trials, metric, direction=direction, out=out,
                      on_trial=_trial_lines(trials, metric), overrides=overrides or [])
    study = result.study
    keys = [parse_space(s).key for s in space]
    table = Table(title=f"{len(study.trials)} trial(s), {direction} {shown(metric)}", title_justify="left")
    for column in ["trial", "state", *keys, shown(metric)]:
        table.add_column(shown(column))
    best = _best_number(study)
    for t in study.trials:
        cells = [str(t.number) + (" *" if t.number == best else ""), t.state.name.lower()]
        cells += [shown(f"{t.params[k]:.4g}" if isinstance(t.params.get(k), float) else t.params.get(k, "")) for k in keys]
        cells.append("" if t.value is None else f"{t.value:.4f}")
        table.add_row(*cells)
    Console().print(table)
    written = ", ".join(shown(p) for p in result.written)
    err.print(f"[green]ok[/green] search in {shown(result.out)}: wrote {written}", highlight=False, soft_wrap=True)


def _trial_lines(total: int, metric: str):
    """One line as each trial starts (its number of the search's total, its folder, the sampled
    values) and one as it ends (its metric, pruned, or failed), around the trial's own output."""
    numbers: dict[int, int] = {}

    def finished(study) -> int:
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(study.get_trials(deepcopy=False, states=states))

    def on_trial(event: str, trial, values: dict) -> None:
        if event == "start":
            numbers[trial.number] = number = finished(trial.study) + 1
            settings = " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                                for key, value in values.items())
            err.print(f"[bold]trial {number} of {total}[/bold] ({shown(trial.user_attrs.get('run_dir', ''))}): "
                      f"{shown(settings)}", highlight=False, soft_wrap=True)
            return
        head = f"trial {numbers.get(trial.number, trial.number + 1)} of {total}"
        state = trial.state.name.lower()
        if state == "complete":
            err.print(f"[bold]{head}[/bold]: {shown(metric)} {trial.value:.4f}", highlight=False, soft_wrap=True)
        elif state == "pruned":
            step, value = max(trial.intermediate_values.items(), default=(None, None))
            at = f" at step {step} ({shown(metric)} {value:.4f})" if step is not None else ""
            err.print(f"[bold]{head}[/bold]: pruned{at}: the pruner judged it would not beat the trials before it",
                      highlight=False, soft_wrap=True)
        else:
            err.print(f"[bold]{head}[/bold]: {state} (see above); the search goes on", highlight=False,
                      soft_wrap=True)

    return on_trial


def _best_number(study) -> int | None:
    try:
        return study.best_trial.number
    except ValueError:
        return None
