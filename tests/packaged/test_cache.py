"""The packaged-model cache: converted once, verified before it is published, whole or absent,
rebuilt when damaged, one conversion when two resolvers race (a fake converter: fast)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml

from lora_cli.errors import LoraCliError, UserInputError
from lora_cli.packaged import cache, registry
from tests.packaged.conftest import FAKE
from tests.training._util import loracli


def _resolve() -> Path:
    return Path(registry.resolve(f"pypi:{FAKE}", "model.name_or_path"))


def test_converted_once_then_reused(fake, cache_dir, capfd):
    folder = _resolve()
    err = capfd.readouterr().err
    assert folder == cache_dir / "packaged" / f"{FAKE}-1.0"
    assert f"converting {FAKE} 1.0 (tiny ViT, JSON) into {folder} ... done in" in err
    assert err.count("converting") == 1 and err.endswith(" s\n")
    marker = json.loads((folder / cache.MARKER).read_text())
    assert marker["package"] == FAKE and marker["version"] == "1.0"
    assert marker["verification"] == {"max_abs_diff": 0.0, "source": "tiny"}
    assert marker["files"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size
    assert fake.calls == 1

    assert _resolve() == folder
    assert fake.calls == 1 and "converting" not in capfd.readouterr().err


def test_a_failed_verification_caches_nothing(fake, cache_dir, capfd):
    fake.fail = True
    with pytest.raises(LoraCliError, match="differs from the packaged one") as err:
        _resolve()
    assert not isinstance(err.value, UserInputError)  # exit 1: the work failed, the input was fine
    assert capfd.readouterr().err.endswith("... failed\n")
    packaged = cache_dir / "packaged"
    assert not (packaged / f"{FAKE}-1.0").exists()
    assert [p.name for p in packaged.iterdir()] == [f".{FAKE}-1.0.lock"]  # no half-written folder left


def test_a_failed_verification_is_exit_1_for_train(fake, cache_dir, tmp_path, monkeypatch, capsys, imagefolder):
    fake.fail = True
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "t", "task": "image-classification", "output_dir": str(run),
        "model": {"name_or_path": f"pypi:{FAKE}"}, "data": {"imagefolder": str(imagefolder)},
        "adapter": {"method": "lora", "r": 4, "target_modules": ["query"]}, "training": {"max_steps": 1},
    }), encoding="utf-8")
    assert loracli(monkeypatch, "train", str(recipe)) == 1
    assert "differs from the packaged one" in capsys.readouterr().err
    assert not run.exists() and not (cache_dir / "packaged" / f"{FAKE}-1.0").exists()


def _truncate(folder: Path) -> str:
    (folder / "model.safetensors").write_bytes(b"x")
    return "model.safetensors has 1 bytes"


def _drop_marker(folder: Path) -> str:
    (folder / cache.MARKER).unlink()
    return "is missing or unreadable"


def _drop_weights(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    return "model.safetensors is missing"


def _older_converter(folder: Path) -> str:
    marker = json.loads((folder / cache.MARKER).read_text())
    marker["revision"] = 0
    (folder / cache.MARKER).write_text(json.dumps(marker))
    return "older converter"


@pytest.mark.parametrize("damage", [_truncate, _drop_marker, _drop_weights, _older_converter])
def test_a_damaged_entry_is_converted_again(fake, cache_dir, damage):
    folder = _resolve()
    why = damage(folder)
    with pytest.warns(UserWarning, match=why):
        assert _resolve() == folder
    assert fake.calls == 2
    assert cache.damage(folder, registry.REGISTRY[FAKE], "1.0") is None


def test_racing_resolvers_convert_once(fake, cache_dir):
    fake.hold = 0.5  # the first converts while the second arrives and waits on the lock
    start = threading.Barrier(2)
    found: list[Path] = []
    errors: list[BaseException] = []

    def resolve() -> None:
        start.wait()
        try:
            found.append(_resolve())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert fake.calls == 1 and len(found) == 2 and found[0] == found[1]
    assert cache.damage(found[0], registry.REGISTRY[FAKE], "1.0") is None


def test_leftovers_of_a_dead_conversion_are_removed(fake, cache_dir):
    stale = cache_dir / "packaged" / f".{FAKE}-1.0.tmp-dead"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    _resolve()
    assert not stale.exists()


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "own"
    monkeypatch.delenv("LORACLI_CACHE")
    assert cache.cache_root() == tmp_path / "xdg" / "loracli"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "loracli"


def test_an_unwritable_cache_is_bad_input(fake, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LORACLI_CACHE", str(blocker))
    with pytest.raises(UserInputError, match="set LORACLI_CACHE to a writable folder"):
        _resolve()
    assert fake.calls == 0
