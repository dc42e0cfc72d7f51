from __future__ import annotations

import csv
import json

import pytest
import torch

from lora_cli.errors import UserInputError
from lora_cli.inference.predict import (
    predictions_json,
    predictions_table,
    write_predictions_csv,
)
from lora_cli.tasks.image_classification import predict_files
from tests.inference.conftest import ID2LABEL
from tests.inference.images_fixture import make_user_images


@pytest.fixture
def user_folder(tmp_path):
    make_user_images(tmp_path / "photos")
    return tmp_path / "photos"


def test_folder_of_mixed_images_four_predictions_one_error(adapter_model, processor, user_folder):
    results = predict_files(adapter_model, processor, [user_folder], ID2LABEL, top_k=2, batch_size=2)
    assert [r.file.rsplit("/", 1)[-1] for r in results] == [
        "a_photo.jpg", "b_alpha.png", "c_gray.png", "d_rotated.jpg", "e_corrupt.jpg"
    ]
    good, bad = results[:4], results[4]
    for r in good:
        assert r.ok and len(r.labels) == 2 and set(r.labels) <= set(ID2LABEL.values())
        assert r.probabilities[0] >= r.probabilities[1] > 0
    assert not bad.ok and "corrupt or truncated" in bad.error and not bad.labels


def test_predictions_match_a_direct_forward(adapter_model, processor, user_folder):
    # predict feeds the model what `eval` feeds it (the eval cache's decode), not the HF processor
    import datasets

    from lora_cli.recipe import ImageData
    from lora_cli.tasks import image_classification as ic

    files = sorted(user_folder.glob("*.png")) + [user_folder / "d_rotated.jpg"]
    results = predict_files(adapter_model, processor, files, ID2LABEL, top_k=3, batch_size=8)
    rows = datasets.Dataset.from_dict({"image": [str(f) for f in files], "label": [0] * len(files)})
    rows = rows.cast_column("image", datasets.Image(decode=False))
    eval_rows = ic._eval_batches(rows, processor, ImageData(imagefolder="unused"))
    pixels = ic.make_collator(processor)([eval_rows[i] for i in range(len(files))])["pixel_values"]
    with torch.no_grad():
        probs = adapter_model(pixel_values=pixels).logits.softmax(-1)
    for r, p in zip(results, probs, strict=True):
        assert r.labels[0] == ID2LABEL[int(p.argmax())]
        assert r.probabilities == pytest.approx(sorted(p.tolist(), reverse=True), abs=1e-5)


def test_top_k_larger_than_classes_is_clipped(adapter_model, processor, user_folder):
    results = predict_files(adapter_model, processor, [user_folder / "c_gray.png"], ID2LABEL, top_k=10)
    assert len(results[0].labels) == 3 and sum(results[0].probabilities) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UserInputError, match="--top-k must be at least 1"):
        predict_files(adapter_model, processor, [user_folder], ID2LABEL, top_k=0)


def test_renderers(adapter_model, processor, user_folder, tmp_path):
    from rich.console import Console

    results = predict_files(adapter_model, processor, [user_folder], ID2LABEL, top_k=2)
    console = Console(record=True, width=200)
    console.print(predictions_table(results))
    text = console.export_text()
    assert "a_photo.jpg" in text and "error: corrupt or truncated" in text

    objs = json.loads(json.dumps(predictions_json(results)))
    assert objs[0]["top_k"][0]["label"] in ID2LABEL.values() and objs[0]["error"] is None
    assert objs[4]["error"] and objs[4]["top_k"] == []

    out = write_predictions_csv(results, tmp_path / "preds.csv")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and rows[0]["label_1"] == results[0].labels[0]
    assert float(rows[1]["probability_2"]) == pytest.approx(results[1].probabilities[1], abs=1e-6)
    assert rows[4]["error"].startswith("corrupt") and rows[4]["label_1"] == ""
