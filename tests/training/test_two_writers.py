"""Two writers, one folder (issue 23): a second sweep or search in a folder another process
is writing is refused (exit 2, naming who holds it), and the verbs that build their folder
aside never rename it onto a folder another process filled meanwhile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lora_cli import rundir as rd
from tests.inference.runs_fixture import folder_bytes, make_run
from tests.training._util import write_recipe

REPO = Path(__file__).resolve().parents[2]
HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lora_cli.rundir import RunLock
    lock = RunLock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from lora_cli.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["loracli", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of ``tmp_path / 'shared'`` (it exits with the test)."""
    folder = tmp_path / "shared"
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True,
                               cwd=REPO)
    assert process.stdout.readline().strip() == "locked"
    yield folder, process
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_second_sweep_is_refused_naming_the_holder(holder, tmp_path, imagefolder, monkeypatch, capsys, dry_run):
    folder, process = holder
    rd.write_json(folder / "sweep.json", {"points": {}})  # the first sweep's folder
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "runs" / "tiny")
    trained = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: trained.append(a) or subprocess.CompletedProcess(a, 1))
    before = snapshot(folder)
    args = ["sweep", recipe, "adapter.method=lora,loha", "--out", folder] + (["--dry-run"] if dry_run else [])
    code, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2, err
    assert "in use by another loracli process" in err and f"pid {process.pid} on " in err and " since " in err
    assert "give this sweep another --out" in err and len(err.strip().splitlines()) == 1
    assert trained == [] and snapshot(folder) == before


def test_a_second_search_is_refused_naming_the_holder(holder, tmp_path, imagefolder, monkeypatch, capsys):
    folder, process = holder
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "runs" / "tiny")
    code, err = run_cli(monkeypatch, capsys, "tune", recipe, "--space", "adapter.r=int(2,4)", "--out", folder)
    assert code == 2, err
    assert f"pid {process.pid} on " in err and "give this search another --out" in err
    assert [p.name for p in folder.iterdir()] == [rd.LOCK_FILE]


@pytest.mark.slow
def test_two_real_sweeps_on_one_folder(tmp_path, imagefolder):
    """The first sweep trains (a long point); the second, started meanwhile, is refused and
    leaves the first one's record alone; killed, the first leaves no lock behind."""
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "runs" / "tiny")
    folder = tmp_path / "sweep"
    command = [sys.executable, "-m", "lora_cli", "sweep", str(recipe), "adapter.r=2,3", "training.max_steps=100000",
               "--out", str(folder)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while rd.RunLock(folder).holder() is None or not (folder / "r-2").is_dir():
            assert first.poll() is None and time.monotonic() < deadline, "the first sweep did not start"
            time.sleep(0.5)
        record = (folder / "sweep.json").read_bytes()
        second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid} on " in second.stderr and "in use by another loracli process" in second.stderr
        assert (folder / "sweep.json").read_bytes() == record
        assert json.loads(record)["points"] == {}  # the first point is still training: nothing failed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert rd.RunLock(folder).holder() is None


def test_a_folder_filled_meanwhile_is_never_replaced(tmp_path, imagefolder, monkeypatch, capsys):
    """combine checks --out (absent), builds its run aside; another process creates --out with
    its own files before the rename: those stay, and the command fails with one line."""
    from lora_cli.inference import combine as combine_mod

    runs = [make_run(tmp_path / "runs", name, imagefolder, seed=i) for i, name in enumerate("ab")]
    out = tmp_path / "ab"
    real = combine_mod.write_run_files

    def meanwhile(staging, *args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("another writer's file")
        return real(staging, *args, **kwargs)

    monkeypatch.setattr(combine_mod, "write_run_files", meanwhile)
    code, err = run_cli(monkeypatch, capsys, "combine", *runs, "--out", out)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "filled by another process" in err
    assert folder_bytes(out) == {"theirs.txt": b"another writer's file"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ab", "images", "runs"]  # no staging folder left
