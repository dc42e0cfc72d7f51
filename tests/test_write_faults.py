"""Faults while the newer verbs write (issue 23): a full disk or a read-only folder during
`export`, `combine` and `sweep` ends with one clear line and exit 1, and leaves nothing
half-written. Tests run as root, for whom chmod forbids nothing, so the failing write is
made to fail where it happens (ENOSPC / EROFS, as the kernel reports them)."""

from __future__ import annotations

import errno
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest

from lora_cli import rundir as rd
from tests.helpers import message_lines
from tests.inference.runs_fixture import folder_bytes, make_run
from tests.training._util import write_recipe

FULL = "No space left on device"
READ_ONLY = "Read-only file system"


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from lora_cli.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["loracli", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def full_disk(path) -> OSError:
    return OSError(errno.ENOSPC, FULL, str(path))


def messages(err: str) -> list[str]:
    """stderr's lines, without the progress lines of the data phases."""
    return message_lines(err)


def one_failure_line(err: str, cause: str) -> str:
    lines = messages(err)
    assert len(lines) == 1 and lines[0].startswith("failed: could not write") and cause in lines[0], err
    assert "internal error" not in err and "Traceback" not in err
    return lines[0]


def _half_written(path: Path) -> None:
    Path(path).write_bytes(b"{half")  # what a write that stopped midway leaves


@pytest.fixture
def runs(tmp_path, imagefolder):
    return [make_run(tmp_path / "runs", name, imagefolder, seed=i) for i, name in enumerate("ab")]


@pytest.mark.parametrize("step", ["report", "onnx", "read-only"])
def test_export_on_a_full_or_read_only_disk(runs, tmp_path, monkeypatch, capsys, step):
    import tempfile

    import torch

    out = tmp_path / "onnx"
    if step == "report":  # the last write, export.json
        def write_json(path, data):
            _half_written(path)
            raise full_disk(path)
        monkeypatch.setattr(rd, "write_json", write_json)
    elif step == "onnx":  # the exporter's own write of model.onnx
        def onnx_export(model, args, path, **kwargs):
            _half_written(path)
            raise full_disk(path)
        monkeypatch.setattr(torch.onnx, "export", onnx_export)
    else:  # the first write, the folder built beside --out
        def mkdtemp(*args, **kwargs):
            raise OSError(errno.EROFS, READ_ONLY, str(tmp_path))
        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    before = snapshot(tmp_path / "runs")
    code, err = run_cli(monkeypatch, capsys, "export", runs[0], "--out", out, "--n", "2")
    assert code == 1, err
    one_failure_line(err, READ_ONLY if step == "read-only" else FULL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "runs"]  # no output, no staging folder
    assert snapshot(tmp_path / "runs") == before


@pytest.mark.parametrize("step", ["weights", "read-only"])
def test_combine_on_a_full_or_read_only_disk(runs, tmp_path, monkeypatch, capsys, step):
    import tempfile

    from safetensors import SafetensorError

    from lora_cli.adapters import state

    out = tmp_path / "ab"
    assert run_cli(monkeypatch, capsys, "combine", *runs, "--out", out)[0] == 0  # an earlier combine: it stays
    if step == "weights":  # safetensors reports the kernel's error inside its own exception
        def save_file(tensors, path, metadata=None):
            _half_written(path)
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        monkeypatch.setattr(state, "save_file", save_file)
    else:
        def mkdtemp(*args, **kwargs):
            raise OSError(errno.EROFS, READ_ONLY, str(tmp_path))
        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    before = snapshot(tmp_path)
    code, err = run_cli(monkeypatch, capsys, "combine", *runs, "--out", out, "--overwrite", "--weights", "0.2,0.8")
    assert code == 1, err
    line = one_failure_line(err, READ_ONLY if step == "read-only" else FULL)
    assert "earlier folder there is kept" in line
    assert snapshot(tmp_path) == before


def _fake_train(code: int):
    def run(command, **kwargs):
        return subprocess.CompletedProcess(command, code)
    return run


def test_sweep_on_a_full_disk_keeps_its_record_whole(tmp_path, imagefolder, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "runs" / "tiny")
    monkeypatch.setattr(subprocess, "run", _fake_train(1))  # each point "trains" (and fails) at once
    real = rd.write_json
    calls = []

    def write_json(path, data):
        calls.append(path)
        if len(calls) == 3:  # the record after the second point
            _half_written(Path(path).with_name(".sweep.tmp-1.json"))
            raise full_disk(path)
        return real(path, data)

    monkeypatch.setattr(rd, "write_json", write_json)
    folder = tmp_path / "sweep"
    code, err = run_cli(monkeypatch, capsys, "sweep", recipe, "adapter.r=2,3", "--out", folder)
    assert code == 1, err
    failures = [line for line in messages(err) if line.startswith(("failed:", "error:", "internal"))]
    assert len(failures) == 1 and FULL in failures[0] and "completed points are kept" in failures[0], err
    record = __import__("json").loads((folder / "sweep.json").read_text())  # the record after the first point
    assert list(record["points"]) == ["r-2"]
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".sweep.tmp")) == [".loracli.lock",
                                                                                            "sweep.json"]


def test_sweep_into_a_read_only_folder(tmp_path, imagefolder, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "runs" / "tiny")
    monkeypatch.setattr(subprocess, "run", _fake_train(0))
    folder = tmp_path / "sweep"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if Path(self) == folder:
            raise OSError(errno.EROFS, READ_ONLY, str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    before = snapshot(tmp_path)
    code, err = run_cli(monkeypatch, capsys, "sweep", recipe, "adapter.r=2,3", "--out", folder)
    assert code == 1, err
    one_failure_line(err, READ_ONLY)
    assert snapshot(tmp_path) == before


def test_an_earlier_export_survives_a_full_disk(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "onnx"
    assert run_cli(monkeypatch, capsys, "export", runs[0], "--out", out, "--n", "2")[0] == 0
    earlier = folder_bytes(out)

    def write_json(path, data):
        raise full_disk(path)

    monkeypatch.setattr(rd, "write_json", write_json)
    code, err = run_cli(monkeypatch, capsys, "export", runs[0], "--out", out, "--n", "2", "--force")
    assert code == 1
    assert "earlier folder there is kept" in one_failure_line(err, FULL)
    assert folder_bytes(out) == earlier


def test_train_on_a_full_disk_says_so_in_one_line(tmp_path, imagefolder, monkeypatch, capsys):
    """A sweep point's `train`: safetensors' own error for a full disk is a failed write too."""
    from safetensors import SafetensorError

    from lora_cli.adapters import state

    def save_file(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(state, "save_file", save_file)
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run")
    code, err = run_cli(monkeypatch, capsys, "train", recipe)
    assert code == 1, err
    failures = [line for line in messages(err) if line.startswith(("failed:", "error:", "internal"))]
    assert len(failures) == 1 and failures[0].startswith("failed: could not write the run in"), err
    assert FULL in failures[0] and rd.read_status(tmp_path / "run")["state"] == "failed"
