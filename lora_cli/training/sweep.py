"""The grid of ``loracli sweep``: axes -> points, each a list of recipe overrides.

    loracli sweep recipes/quickstart.yaml adapter.method=lora,loha,lokr,adalora adapter.r=8,16

An item with commas outside brackets and quotes is an axis; one without is a fixed
override every point gets. Points are the cartesian product of the axes, each trained as
its own run directory ``<sweep>/<point>`` (``<sweep>`` defaults to ``runs/<name>-sweep``).

When a point changes ``adapter.method``, the base recipe's options that only the old
method knows are carried over where the new one has the same knob, and dropped otherwise
(each carried or dropped option is listed in the plan):

    lora_alpha <-> alpha               the same scale, named per method
    r -> init_r, target_r (AdaLoRA)    init_r = r (LoRA's parameter count), target_r = 2r/3
    init_r -> r (from AdaLoRA)
    anything else the new method lacks  dropped (lora_dropout, use_dora, tinit, ...)

Options set by an axis or a fixed override are never translated: a value the point's
method refuses is that point's recipe error.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli import rundir as rd
from lora_cli.atomic import write_text
from lora_cli.errors import UserInputError
from lora_cli.recipe import load_recipe
from lora_cli.recipe.adapter import carry_options, written_options
from lora_cli.recipe.overrides import parse_override
from lora_cli.recipe.schema import RUN_NAME_CHARS, RUN_NAME_MAX
from lora_cli.recipe.yamlio import dump
from lora_cli.training.preflight import protected_paths

METHOD_KEY = "adapter.method"
POINT_RECIPES = "recipes"
"""``<sweep>/recipes/<point>.yaml``: the recipes of the points that change the method."""
SWEEP_FILE = "sweep.json"
"""Each point's state; written first into a new sweep folder, it marks the folder as a sweep's
(the only kind of non-empty folder a sweep writes into)."""
LOCK_HINT = "or give this sweep another --out"


@dataclass
class Point:
    """One run of the sweep."""

    name: str
    values: dict[str, str]  # axis key -> value as typed
    run_dir: Path
    recipe: Path  # the recipe file `loracli train` gets
    overrides: list[str]  # what `loracli train RECIPE ...` gets (output_dir and name included)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # the recipe error of an invalid point


def split_values(text: str) -> list[str]:
    """``a,b,[c, d]`` -> ``['a', 'b', '[c, d]']``: commas inside brackets or quotes stay."""
    parts, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += char
    parts.append(current.strip())
    return parts


def parse_axes(items: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """(axes {key: values}, fixed overrides); malformed items are one UserInputError."""
    axes: dict[str, list[str]] = {}
    fixed: list[str] = []
    problems = []
    for item in items:
        if item.startswith("~"):
            fixed.append(item)
            continue
        parsed = parse_override(item)
        if isinstance(parsed, str):
            problems.append(f"{item!r} {parsed}")
            continue
        key, text = item.split("=", 1)
        values = split_values(text)
        if len(values) == 1:
            fixed.append(item)
        elif any(not v for v in values):
            problems.append(f"{item!r} has an empty value (write key=a,b,c)")
        elif key.strip() in axes:
            problems.append(f"{item!r} repeats the axis {key.strip()}; give all its values in one item")
        else:
            axes[key.strip()] = values
    if problems:
        raise UserInputError("sweep: " + "; ".join(problems))
    if not axes:
        raise UserInputError("sweep: no axis given; name one as key=value1,value2, e.g. adapter.method=lora,loha")
    return axes, fixed


def _safe_name(text: str) -> str:
    """Run-name characters only: each run of others becomes one ``-``."""
    return re.sub("-{2,}", "-", "".join(c if c in RUN_NAME_CHARS else "-" for c in text)).strip("-.") or "x"


def point_name(values: dict[str, str]) -> str:
    """``lora_r-8``: the method's value alone, other axes as ``<last key part>-<value>``."""
    parts = [v if k == METHOD_KEY else f"{k.split('.')[-1]}-{v}" for k, v in values.items()]
    return _safe_name("_".join(parts))[:RUN_NAME_MAX]


def sweep_folder(recipe_path: Path, items: list[str], sweep_dir: Path | None = None) -> Path:
    """The sweep folder (``--out``, default ``runs/<name>-sweep``), checked against the folder rule;
    a broken base recipe, fixed override or axis stops the sweep here."""
    axes, fixed = parse_axes(items)
    base = load_recipe(recipe_path, fixed)
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else base.output_path.parent / f"{base.name}-sweep"
    check_sweep_dir(sweep_dir, base, recipe_path)
    return sweep_dir


@contextlib.contextmanager
def holding(sweep_dir: Path, dry_run: bool = False) -> Iterator[None]:
    """One sweep at a time in a folder: the folder's lock (:class:`lora_cli.rundir.RunLock`, as
    ``train`` holds a run's) for the whole sweep; a second sweep gets exit 2 naming the holder
    (pid, host, start time). A dry run takes no lock, but refuses while a sweep runs there
    (it would rewrite the recipes that sweep trains from)."""
    if dry_run:
        holder = rd.RunLock(sweep_dir).holder() if sweep_dir.is_dir() else None
        if holder is not None:
            raise rd.RunInUseError(sweep_dir, holder, LOCK_HINT)
        yield
        return
    with rd.RunLock(sweep_dir, hint=LOCK_HINT):
        claim_sweep_dir(sweep_dir)
        yield


def plan(recipe_path: Path, items: list[str], sweep_dir: Path | None = None) -> tuple[Path, list[Point]]:
    """The sweep folder and its points, each validated (an invalid point carries its error).

    A point that changes the method trains from ``<sweep>/recipes/<point>.yaml``: the base
    recipe resolved, its adapter section carried over (overrides cannot remove keys the
    new method lacks). The others train from the recipe itself."""
    axes, fixed = parse_axes(items)
    base = load_recipe(recipe_path, fixed)  # a broken base recipe or fixed override stops the sweep here
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else base.output_path.parent / f"{base.name}-sweep"
    check_sweep_dir(sweep_dir, base, recipe_path)
    options = written_options(base.adapter)
    given = set(axes)
    points, seen = [], set()
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        name = point_name(values)
        while name in seen:
            name += "-"
        seen.add(name)
        source, overrides, notes = Path(recipe_path), list(fixed), []
        method = parse_override(f"{METHOD_KEY}={values[METHOD_KEY]}")[1] if METHOD_KEY in values else base.adapter.method
        if method != base.adapter.method:
            adapter, notes = carry_options(options, str(method), given)
            source, overrides = _point_recipe(base, sweep_dir, name, {"method": method, **adapter}), []
        overrides += [f"{k}={v}" for k, v in values.items() if k != METHOD_KEY or source == Path(recipe_path)]
        run_name = _safe_name(f"{base.name}-{name}")[:RUN_NAME_MAX]
        # JSON strings are YAML double-quoted scalars: any path reads back as itself
        overrides += [f"name={run_name}", f"output_dir={json.dumps(str(sweep_dir / name))}"]
        point = Point(name, values, sweep_dir / name, source, overrides, notes)
        try:
            load_recipe(source, overrides)
        except UserInputError as exc:
            point.error = str(exc)
        points.append(point)
    return sweep_dir, points


def check_sweep_dir(sweep_dir: Path, base, recipe_path: Path) -> None:
    """The folder rule (:mod:`lora_cli.rundir.guard`): new, empty, or an earlier sweep's folder
    (``sweep.json``); never the working directory, the recipe or the data, nor inside the data."""
    rd.check_output_dir(sweep_dir, rd.Output("--out", "sweep", SWEEP_FILE, f"runs/{base.name}-sweep-2"),
                        reads=protected_paths(base, recipe_path), update=True)


def claim_sweep_dir(sweep_dir: Path) -> None:
    """Create the sweep folder with its marker before anything else is written into it."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not (sweep_dir / SWEEP_FILE).is_file():
        rd.write_json(sweep_dir / SWEEP_FILE, {"points": {}})


def _point_recipe(base, sweep_dir: Path, name: str, adapter: dict[str, Any]) -> Path:
    data = base.to_dict()
    data["adapter"] = adapter
    path = sweep_dir / POINT_RECIPES / f"{name}.yaml"
    claim_sweep_dir(sweep_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, f"# loracli sweep point {name}, from {base.source}\n" + dump(data))
    return path


def is_done(point: Point) -> bool:
    """The point's run directory holds a completed run of exactly this point's recipe."""
    run = point.run_dir
    if rd.read_status(run).get("state") != "completed" or not (run / rd.RECIPE_FILE).is_file():
        return False
    try:
        return load_recipe(run / rd.RECIPE_FILE) == load_recipe(point.recipe, point.overrides)
    except UserInputError:
        return False
