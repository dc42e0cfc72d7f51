"""Links out of a run: no verb reads, copies or uploads through a link that leaves the run
(issue 23, "symlinks out of a run"); a run that is itself reached through a link is fine."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from lora_cli import rundir as rd
from tests.inference.runs_fixture import make_run

SECRET = b"TOP-SECRET: the key outside the run"


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from lora_cli.cli import main

    capsys.readouterr()  # what the test's set-up printed is not the command's
    monkeypatch.setattr(sys, "argv", ["loracli", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


def _link_out(run: Path, outside: Path, where: str) -> Path:
    """Plant a link that leaves ``run`` (or a folder link) at ``where``; return the link."""
    secret = outside / "secret.bin"
    secret.write_bytes(SECRET)
    if where == "plots":
        link = run / "plots" / "loss.png"
        link.parent.mkdir(exist_ok=True)
        os.symlink(secret, link)
    elif where == "base_model":  # a file swapped for a link to a copy elsewhere: looks the same, lives outside
        link = run / "base_model" / "config.json"
        shutil.copy(link, outside / "config.json")
        link.unlink()
        os.symlink(outside / "config.json", link)
    elif where == "base_model-folder":  # the whole folder linked to a copy elsewhere
        link = run / "base_model"
        shutil.copytree(link, outside / "base_model")
        shutil.rmtree(link)
        os.symlink(outside / "base_model", link)
    elif where == "adapter":
        link = run / "adapter" / "adapter_model.safetensors"
        shutil.copy(link, outside / "adapter_model.safetensors")
        link.unlink()
        os.symlink(outside / "adapter_model.safetensors", link)
    elif where == "processor":
        link = run / "processor" / "preprocessor_config.json"
        shutil.copy(link, outside / "preprocessor_config.json")
        link.unlink()
        os.symlink(outside / "preprocessor_config.json", link)
    elif where == "loop":  # a folder link back to the run itself
        link = run / "plots" / "self"
        link.parent.mkdir(exist_ok=True)
        os.symlink(run, link, target_is_directory=True)
    else:
        raise AssertionError(where)
    return link


@pytest.mark.parametrize("where", ["plots", "base_model", "base_model-folder", "adapter", "processor", "loop"])
def test_push_never_publishes_through_a_link_out_of_the_run(tmp_path, imagefolder, where, monkeypatch, capsys):
    run = make_run(tmp_path / "runs", "run", imagefolder)
    outside = tmp_path / "outside"
    outside.mkdir()
    link = _link_out(run, outside, where)
    before = snapshot(tmp_path)
    code, err = run_cli(monkeypatch, capsys, "push", run, "me/x", "--dry-run", tmp_path / "to-push")
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(link) in err, err
    assert snapshot(tmp_path) == before and not (tmp_path / "to-push").exists()


@pytest.mark.parametrize("verb", ["eval", "merge", "export", "combine", "convert", "compare", "predict"])
def test_every_verb_refuses_a_run_with_a_link_out_of_it(tmp_path, imagefolder, verb, monkeypatch, capsys):
    runs = tmp_path / "runs"
    run = make_run(runs, "run", imagefolder, method="loha" if verb == "convert" else "lora")
    other = make_run(runs, "other", imagefolder, seed=2)
    outside = tmp_path / "outside"
    outside.mkdir()
    link = _link_out(run, outside, "adapter")
    image = next((imagefolder / "validation").rglob("*.png"))
    args = {
        "eval": ["eval", run],
        "merge": ["merge", run, "--out", tmp_path / "merged", "--n", "2"],
        "export": ["export", run, "--out", tmp_path / "onnx", "--n", "2"],
        "combine": ["combine", other, run, "--out", tmp_path / "ab"],
        "convert": ["convert", run, "--rank", "2", "--out", tmp_path / "lora"],
        "compare": ["compare", run, other, "--no-plot"],
        "predict": ["predict", image, "--run", run],
    }[verb]
    before = snapshot(tmp_path)
    code, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2, err
    assert "outside the run" in err and str(link) in err, err
    assert snapshot(tmp_path) == before


def test_a_run_reached_through_a_link_is_published_whole(tmp_path, imagefolder):
    from lora_cli.inference.push import push_run

    run = make_run(tmp_path / "store", "run", imagefolder)
    (run / "plots").mkdir()
    (run / "plots" / "loss.png").write_bytes(b"\x89PNG fake")
    os.symlink(run / "plots" / "loss.png", run / "plots" / "loss-copy.png")  # a link that stays inside: fine
    alias = tmp_path / "latest"
    os.symlink(run, alias, target_is_directory=True)
    out = tmp_path / "to-push"
    push_run(alias, "me/x", dry_run=out)
    assert (out / "adapter_model.safetensors").read_bytes() == (run / rd.ADAPTER_DIR / "adapter_model.safetensors").read_bytes()
    assert (out / "plots" / "loss-copy.png").read_bytes() == b"\x89PNG fake"
    assert not any(p.is_symlink() for p in out.rglob("*"))
