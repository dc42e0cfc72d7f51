"""Image / tabular training data that used to give silently wrong answers or crash mid-run.

Every check runs in ``load_raw`` (before ``train`` writes its run directory); the images
here are tiny and made by the tests.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_cli.errors import UserInputError
from lora_cli.recipe import load_recipe
from lora_cli.tasks import image_classification as ic
from lora_cli.tasks.data import common as data_mod
from lora_cli.tasks.data.images import ImageLoadError, check_image, expand_inputs, load_image
from tests.helpers import class_image, data_and_seed, make_imagefolder, tiny_vit
from tests.training._util import loracli, write_recipe


# ------------------------------------------------------------------ helpers
def _recipe(tmp_path, images, **data):
    path = write_recipe(tmp_path / "r.yaml", images, tmp_path / "run", data={"imagefolder": str(images), **data})
    return load_recipe(path)


def _cli_recipe(tmp_path, images, **data):
    return write_recipe(tmp_path / "r.yaml", images, tmp_path / "run", data={"imagefolder": str(images), **data})


def _bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A valid PNG header claiming 10 gigapixels, with a few bytes of data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _bad_files(folder: Path) -> dict[str, Path]:
    """A truncated JPEG, a zero-byte PNG, a text file named .jpg, a decompression bomb."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    whole = folder / "whole.tmp"
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(whole, format="JPEG", quality=95)
    paths = {
        "truncated": folder / "truncated.jpg",
        "empty": folder / "empty.png",
        "text": folder / "text.jpg",
        "bomb": folder / "bomb.png",
    }
    paths["truncated"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("this is not a picture\n")
    _bomb_png(paths["bomb"])
    return paths


def _special_images(folder: Path) -> list[Path]:
    """Images whose pixels depend on how they are decoded."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    out = []

    deep = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    out.append(folder / "a_gray16.png")
    Image.fromarray(deep).save(out[-1])

    rgba = np.asarray(class_image(1, rng, 32).convert("RGBA")).copy()
    rgba[:, :16, 3] = 0
    rgba[:, :16, :3] = 0  # black under the transparent half
    out.append(folder / "b_rgba.png")
    Image.fromarray(rgba, mode="RGBA").save(out[-1])

    pal = Image.new("P", (32, 32))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.paste(1, (0, 0, 16, 32))
    out.append(folder / "c_palette.png")
    pal.save(out[-1], transparency=0)  # index 0 (black) is transparent

    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    out.append(folder / "d_exif.jpg")
    rotated.save(out[-1], exif=exif, quality=95)

    out.append(folder / "e_cmyk.jpg")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(out[-1])
    return out


# ------------------------------------------- 1. one loader for every verb
def test_eval_and_predict_give_the_same_tensors_for_awkward_images(tmp_path):
    images = make_imagefolder(tmp_path / "images", per_class=(3, 1), classes=("a", "b"))
    for old in (images / "validation" / "a").iterdir():
        old.unlink()
    files = _special_images(images / "validation" / "a")
    recipe = _recipe(tmp_path, images)
    processor = ic.load_processor(recipe.model)

    eval_ds = ic.eval_dataset(recipe.data, recipe.seed, processor)
    rows = [eval_ds[i] for i in range(len(eval_ds))]
    assert len(rows) == len(files) + 1  # the special images + validation/b's one
    from_eval = ic.make_collator(processor)(rows[: len(files)])["pixel_values"]  # the batch eval gives the model
    from_predict = ic.pixel_values(processor, [load_image(f) for f in files])
    assert torch.equal(from_eval, from_predict)

    # the old decode (datasets' Image feature + convert("RGB")) differs on these files
    naive = ic.pixel_values(processor, [Image.open(f).convert("RGB") for f in files[:3]])
    for i in range(3):
        assert not torch.equal(naive[i], from_predict[i]), files[i].name

    model = tiny_vit(num_labels=2)
    results = ic.predict_files(model, processor, files, {0: "a", 1: "b"}, top_k=2)
    with torch.no_grad():
        probs = model(pixel_values=from_eval).logits.softmax(-1)
    for result, p in zip(results, probs, strict=True):
        assert result.ok
        assert result.probabilities == pytest.approx(sorted(p.tolist(), reverse=True), abs=1e-6)


def test_the_loader_takes_paths_bytes_and_dataset_dicts(tmp_path):
    path = _special_images(tmp_path)[1]
    raw = path.read_bytes()
    expected = np.asarray(load_image(path))
    assert np.array_equal(np.asarray(load_image(raw)), expected)
    assert np.array_equal(np.asarray(load_image({"bytes": raw, "path": "x.png"})), expected)
    assert np.array_equal(np.asarray(load_image({"bytes": None, "path": str(path)})), expected)
    assert (expected[:, :16] == 255).all()  # transparent -> white, not black
    with pytest.raises(ImageLoadError, match=r"x\.png: empty image"):
        load_image({"bytes": b"", "path": "x.png"})


# ------------------------------------------------------ 6. bad image files
def test_check_image_finds_each_kind_of_bad_file(tmp_path):
    bad = _bad_files(tmp_path)
    with pytest.raises(ImageLoadError, match=r"truncated\.jpg: corrupt or truncated"):
        check_image(bad["truncated"])  # the reduced JPEG decode still reads every byte
    with pytest.raises(ImageLoadError, match=r"empty\.png: empty file \(0 bytes\)"):
        check_image(bad["empty"])
    with pytest.raises(ImageLoadError, match=r"text\.jpg: not an image file"):
        check_image(bad["text"])
    with pytest.raises(ImageLoadError, match=r"bomb\.png: .*decompression bomb"):
        check_image(bad["bomb"])
    good = tmp_path / "good.jpg"
    class_image(0, np.random.default_rng(0), 64).save(good, quality=90)
    check_image(good)


def test_bad_images_stop_train_before_anything_is_written(tmp_path, monkeypatch, capsys):
    images = make_imagefolder(tmp_path / "images")
    _bad_files(images / "train" / "churros")
    (images / "validation" / "beignets" / "cut.png").write_bytes(
        (images / "validation" / "beignets" / "beignets_0.png").read_bytes()[:120])
    assert loracli(monkeypatch, "train", _cli_recipe(tmp_path, images)) == 2
    err = capsys.readouterr().err
    assert "4 of the 28 training images cannot be read" in err
    for name in ("truncated.jpg", "empty.png", "text.jpg", "bomb.png"):
        assert name in err
    assert "data.bad_images: skip" in err
    assert not (tmp_path / "run").exists()


def test_bad_images_skip_leaves_them_out_with_a_counted_warning(tmp_path, caplog):
    images = make_imagefolder(tmp_path / "images")
    _bad_files(images / "train" / "churros")
    (images / "validation" / "beignets" / "cut.png").write_bytes(
        (images / "validation" / "beignets" / "beignets_0.png").read_bytes()[:120])
    with caplog.at_level(logging.WARNING):
        splits, labels = ic.load_raw(*data_and_seed(_recipe(tmp_path, images, bad_images="skip")))
    assert (len(splits.train), len(splits.eval)) == (24, 12)
    assert "left out 4 of the 28 training images" in caplog.text
    assert "left out 1 of the 13 validation images" in caplog.text and "cut.png" in caplog.text
    with pytest.raises(UserInputError, match="bad_images"):
        ic.load_raw(*data_and_seed(_recipe(tmp_path, images)))


def test_bad_image_bytes_in_a_hub_dataset_are_found(tmp_path, monkeypatch):
    import datasets

    rng = np.random.default_rng(0)

    def png(label):
        path = tmp_path / "x.png"
        class_image(label, rng).save(path)
        return path.read_bytes()

    rows = [{"bytes": png(i % 2), "path": None} for i in range(6)]
    rows[4] = {"bytes": rows[4]["bytes"][:100], "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    hub = {"train": datasets.Dataset.from_dict({"image": rows, "label": [i % 2 for i in range(6)]}, features=features),
           "validation": datasets.Dataset.from_dict({"image": rows[:2], "label": [0, 1]}, features=features)}
    monkeypatch.setattr(data_mod, "load_hub_splits", lambda data: dict(hub))
    images = make_imagefolder(tmp_path / "unused", per_class=(1, 1))
    with pytest.raises(UserInputError, match=r"1 of the 6 training images cannot be read: training row 4: corrupt"):
        ic.load_raw(*data_and_seed(_recipe(tmp_path, images, imagefolder=None, dataset="someone/food")))
    splits, _ = ic.load_raw(*data_and_seed(_recipe(tmp_path, images, imagefolder=None, dataset="someone/food", bad_images="skip")))
    assert len(splits.train) == 5


# ------------------------------------------------------- 2. empty classes
def test_an_empty_class_folder_is_refused_with_its_name(tmp_path, monkeypatch, capsys):
    images = make_imagefolder(tmp_path / "images")
    (images / "train" / "eclairs").mkdir()
    (images / "train" / "eclairs" / "notes.txt").write_text("todo")
    with pytest.raises(UserInputError, match=r"class folder\(s\) with no images: .*train/eclairs"):
        ic.load_raw(*data_and_seed(_recipe(tmp_path, images)))
    assert loracli(monkeypatch, "train", _cli_recipe(tmp_path, images)) == 2
    assert "eclairs" in capsys.readouterr().err and not (tmp_path / "run").exists()


# --------------------------------------- 3. validation classes train lacks
def test_a_validation_class_folder_absent_from_train(tmp_path, caplog):
    images = make_imagefolder(tmp_path / "images")
    extra = images / "validation" / "eclairs"
    extra.mkdir()
    for i in range(2):
        class_image(0, np.random.default_rng(i)).save(extra / f"e{i}.png")
    with pytest.raises(UserInputError, match=r"unknown_eval_labels: .*validation has class folder\(s\) 'eclairs' "
                                             r"\(2 images\) that .*train lacks.*unknown_eval_labels: drop"):
        ic.load_raw(*data_and_seed(_recipe(tmp_path, images)))
    with caplog.at_level(logging.WARNING):
        splits, labels = ic.load_raw(*data_and_seed(_recipe(tmp_path, images, unknown_eval_labels="drop")))
    assert labels == ["beignets", "churros", "macarons"] and len(splits.eval) == 12
    assert "left out 2 validation images" in caplog.text and "'eclairs'" in caplog.text


def test_a_validation_file_label_absent_from_train(tmp_path, caplog):
    images = make_imagefolder(tmp_path / "images", per_class=(2, 1))
    rows = sorted(str(p.relative_to(images)) for p in (images / "train").rglob("*.png"))
    (images / "train.csv").write_text("image,label\n" + "".join(f"{p},{p.split('/')[1]}\n" for p in rows))
    val = sorted(str(p.relative_to(images)) for p in (images / "validation").rglob("*.png"))
    (images / "val.csv").write_text("image,label\n" + "".join(f"{p},{'eclairs' if i == 0 else p.split('/')[1]}\n"
                                                              for i, p in enumerate(val)))
    data = {"imagefolder": None, "train_file": str(images / "train.csv"), "validation_file": str(images / "val.csv")}
    with pytest.raises(UserInputError, match=r"1 validation row\(s\) of .*val\.csv have label\(s\) 'eclairs' that "
                                             r".*train\.csv never has"):
        ic.load_raw(*data_and_seed(_recipe(tmp_path, images, **data)))
    with caplog.at_level(logging.WARNING):
        splits, labels = ic.load_raw(*data_and_seed(_recipe(tmp_path, images, unknown_eval_labels="drop", **data)))
    assert "eclairs" not in labels and len(splits.eval) == 2 and "'eclairs'" in caplog.text


# ------------------------------------------------ 4. empty / missing labels
def test_missing_labels_name_the_file_row_and_column(tmp_path, monkeypatch, capsys, caplog):
    images = make_imagefolder(tmp_path / "images", per_class=(3, 1))
    rows = sorted(str(p.relative_to(images)) for p in (images / "train").rglob("*.png"))
    lines = [f"{p},{p.split('/')[1]}" for p in rows]
    lines[2] = f"{rows[2]},"  # data row 3, line 4 of the file
    lines[5] = f"{rows[5]},  "
    (images / "train.csv").write_text("image,label\n" + "\n".join(lines) + "\n")
    data = {"imagefolder": None, "train_file": str(images / "train.csv"), "val_split": 0.3}
    with pytest.raises(UserInputError, match=r"missing_labels: .*train\.csv: 2 of its 9 rows have no label in column "
                                             r"'label' \(data row 3 \(line 4\), data row 6 \(line 7\)\)"):
        ic.load_raw(*data_and_seed(_recipe(tmp_path, images, **data)))
    assert loracli(monkeypatch, "train", write_recipe(tmp_path / "r.yaml", images, tmp_path / "run", data=data)) == 2
    assert "data row 3" in capsys.readouterr().err and not (tmp_path / "run").exists()
    with caplog.at_level(logging.WARNING):
        splits, labels = ic.load_raw(*data_and_seed(_recipe(tmp_path, images, missing_labels="drop", **data)))
    assert len(splits.train) + len(splits.eval) == 7 and "None" not in labels
    assert "left out 2 of its 9 rows" in caplog.text


def test_missing_labels_in_jsonl_count_lines(tmp_path):
    images = make_imagefolder(tmp_path / "images", per_class=(2, 1))
    rows = sorted(str(p) for p in (images / "train").rglob("*.png"))
    objs = [{"image": p, "label": Path(p).parent.name} for p in rows]
    objs[1] = {"image": rows[1], "label": None}
    del objs[3]["label"]
    (images / "t.jsonl").write_text("".join(json.dumps(o) + "\n" for o in objs))
    with pytest.raises(UserInputError, match=r"t\.jsonl: 2 of its 6 rows have no label in column 'label' "
                                             r"\(line 2, line 4\)"):
        ic.load_raw(*data_and_seed(_recipe(tmp_path, images, imagefolder=None, train_file=str(images / "t.jsonl"))))


# ------------------------------------------------------ 5. mixed label types
def test_mixed_label_types_follow_one_rule(tmp_path):
    assert [data_mod.canonical_label(v) for v in (1, "1", 1.0, " 1.0 ", np.int64(1), "01", 0.5, "one", "", None,
                                                  float("nan"))] == \
        ["1", "1", "1", "1", "1", "01", "0.5", "one", None, None, None]
    images = make_imagefolder(tmp_path / "images", per_class=(4, 1), classes=("x", "y"))
    files = sorted(str(p) for p in (images / "train").rglob("*.png"))
    values = [1, "1", 1.0, "one", 2, "2.0", "one", 2]
    (images / "t.jsonl").write_text("".join(json.dumps({"image": f, "label": v}) + "\n"
                                            for f, v in zip(files, values, strict=True)))
    val = sorted(str(p) for p in (images / "validation").rglob("*.png"))
    (images / "v.jsonl").write_text("".join(json.dumps({"image": f, "label": v}) + "\n"
                                            for f, v in zip(val, ["1.0", "one"], strict=True)))
    recipe = _recipe(tmp_path, images, imagefolder=None, train_file=str(images / "t.jsonl"),
                     validation_file=str(images / "v.jsonl"))
    splits, labels = ic.load_raw(recipe.data, recipe.seed)
    assert labels == ["1", "2", "one"]
    assert splits.train["label"] == [0, 0, 0, 2, 1, 1, 2, 1] and splits.eval["label"] == [0, 2]

    (images / "t.jsonl").write_text("".join(json.dumps({"image": f, "label": v}) + "\n"
                                            for f, v in zip(files, [True, 1, 0, False, 1, 1, 0, 0], strict=True)))
    with pytest.raises(UserInputError, match=r"data.label_column 'label': mixes true/false \(.*t\.jsonl line 1: "
                                             r"True\) with other labels"):
        ic.load_raw(recipe.data, recipe.seed)


# --------------------------------------------------------- 7. symlink loops
@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_symlink_loops_neither_hang_nor_crash(tmp_path, caplog):
    images = make_imagefolder(tmp_path / "images", per_class=(2, 1))
    os.symlink("..", images / "train" / "churros" / "loop")
    with caplog.at_level(logging.WARNING):
        splits, labels = ic.load_raw(*data_and_seed(_recipe(tmp_path, images)))
    assert len(splits.train) == 6 and "churros/loop/ (a folder)" in caplog.text

    found = expand_inputs([images])
    assert len(found) == len(set(found)) == 9
    assert len(expand_inputs([str(images / "**" / "*.png")])) == 9

    os.symlink(".", images / "train" / "again")
    with pytest.raises(UserInputError, match=r"train/again is a symbolic link to .*a loop"):
        ic.load_raw(*data_and_seed(_recipe(tmp_path, images)))


# ------------------------------------------------ 8. every CSV row is checked
def test_a_missing_image_far_down_a_csv(tmp_path, caplog):
    images = make_imagefolder(tmp_path / "images", per_class=(1, 1))
    rows = [("train/beignets/beignets_0.png", "beignets"), ("train/churros/churros_0.png", "churros")] * 700
    rows[1300] = ("train/churros/gone.png", "churros")
    (images / "big.csv").write_text("image,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    data = {"imagefolder": None, "train_file": str(images / "big.csv"), "val_split": 0.1}
    with pytest.raises(UserInputError, match=r"1 of the 1400 rows of .*big\.csv name no readable image in column "
                                             r"'image': data row 1301 \(line 1302\): image file "
                                             r"'train/churros/gone\.png' not found"):
        ic.load_raw(*data_and_seed(_recipe(tmp_path, images, **data)))
    with caplog.at_level(logging.WARNING):
        splits, _ = ic.load_raw(*data_and_seed(_recipe(tmp_path, images, bad_images="skip", **data)))
    assert len(splits.train) + len(splits.eval) == 1399 and "gone.png" in caplog.text


# ------------------------------------------------------ the recipe fields
def test_the_policies_default_to_error_and_refuse_other_values(tmp_path):
    images = make_imagefolder(tmp_path / "images", per_class=(1, 1))
    data = _recipe(tmp_path, images).data
    assert (data.missing_labels, data.unknown_eval_labels, data.bad_images) == ("error", "error", "error")
    with pytest.raises(UserInputError, match=r"data\.bad_images: must be one of 'error', 'skip' \(got 'ignore'"):
        _recipe(tmp_path, images, bad_images="ignore")
    with pytest.raises(UserInputError, match=r"data\.missing_labels: must be one of 'error', 'drop'"):
        _recipe(tmp_path, images, missing_labels="skip")


def test_images_checked_once_are_not_decoded_again_until_they_change(tmp_path, monkeypatch):
    """A second run (or eval) of the same images skips the decode check; an edited file is checked again."""
    images = make_imagefolder(tmp_path / "images")
    recipe = _recipe(tmp_path, images)
    ic.load_raw(*data_and_seed(recipe))
    calls = []
    real = ic.images.check_image
    monkeypatch.setattr(ic.images, "check_image", lambda *a, **k: calls.append(a) or real(*a, **k))
    ic.load_raw(*data_and_seed(recipe))
    assert calls == []  # the same files: nothing decoded to check them
    victim = next((images / "validation").rglob("*.png"))
    victim.write_bytes(victim.read_bytes()[:120])  # now truncated
    with pytest.raises(UserInputError, match="data.bad_images: 1 of the .* validation images cannot be read"):
        ic.load_raw(*data_and_seed(recipe))
    assert calls  # checked again, and the broken file found
