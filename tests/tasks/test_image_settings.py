"""The one image-settings value: the checkpoint's processor (transformers' or timm's) with the
recipe's ``model.processor`` on top, for a pretrained model as for one built from a config, and
the processor it is saved as reads back to the same value."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_cli.errors import UserInputError
from lora_cli.recipe import ModelSection
from lora_cli.tasks import image_classification as ic
from lora_cli.tasks.data import image_settings as st

DINOV2 = {"size": {"shortest_edge": 256}, "resample": 3, "do_center_crop": True,
          "crop_size": {"height": 224, "width": 224},
          "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


@pytest.fixture
def pretrained(tmp_path):
    """A local 'pretrained' DINOv2 folder (tiny config, random weights) with DINOv2's processor: 256 -> 224."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path / "dinov2"
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=518)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(**DINOV2).save_pretrained(folder)
    return folder


def test_a_dinov2_processor_reads_as_short_side_then_crop():
    from transformers import BitImageProcessor

    settings = st.from_processor(BitImageProcessor(**DINOV2))
    assert settings == st.ImageSettings((224, 224), 256, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert settings.crop == (224, 224) and settings.crop_pct == 224 / 256


def test_timm_data_config_reads_as_timm_eval_transform():
    from transformers import TimmWrapperImageProcessor

    processor = TimmWrapperImageProcessor(pretrained_cfg={
        "input_size": [3, 240, 240], "interpolation": "bicubic", "crop_pct": 0.9, "mean": [0.4, 0.4, 0.4],
        "std": [0.2, 0.2, 0.2]})
    settings = st.from_processor(processor)
    assert settings == st.ImageSettings((240, 240), 266, "bicubic", (0.4, 0.4, 0.4), (0.2, 0.2, 0.2))  # floor(240/0.9)


@pytest.mark.parametrize("recipe, expected", [
    ({"size": 56}, ((56, 56), 64)),  # the checkpoint's crop ratio kept: 256/224 -> 64/56
    ({"size": {"height": 56, "width": 56}, "crop_pct": 1.0}, ((56, 56), (56, 56))),
    ({"crop_pct": 0.5}, ((224, 224), 448)),
])
def test_the_recipe_sizes_apply_over_the_checkpoint(recipe, expected):
    from transformers import BitImageProcessor

    settings = st.resolve(BitImageProcessor(**DINOV2), recipe)
    assert (settings.input_size, settings.resize) == expected
    assert settings.interpolation == "bicubic" and settings.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("settings", [
    st.ImageSettings((56, 56), 64, "bicubic", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)),
    st.ImageSettings((32, 48), (32, 48), "nearest"),
    st.ImageSettings((28, 28), (40, 36), "bilinear"),
])
def test_the_saved_processor_reads_back_the_same(tmp_path, settings):
    from transformers import AutoImageProcessor

    st.to_processor(settings).save_pretrained(tmp_path)
    assert st.from_processor(AutoImageProcessor.from_pretrained(tmp_path)) == settings


@pytest.mark.parametrize("bad, match", [
    ({"sise": 56}, "unknown key"), ({"size": "big"}, "is not a size"), ({"crop_pct": 1.5}, r"\(0, 1\]"),
    ({"interpolation": "lanczos"}, "not one of"), ({"image_mean": [0.5, 0.5]}, "3 values"),
])
def test_bad_settings_are_bad_input(bad, match):
    with pytest.raises(UserInputError, match=match):
        st.with_recipe(st.ImageSettings((8, 8), (8, 8)), bad)


def test_model_processor_applies_to_a_pretrained_model(pretrained):
    """It was ignored unless the model was built from a config: 56 px asked, 256 / 224 decoded."""
    processor = ic.load_processor(ModelSection(name_or_path=str(pretrained), processor={"size": 56}))
    settings = ic.settings(processor)
    assert (settings.input_size, settings.resize, settings.interpolation) == ((56, 56), 64, "bicubic")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    assert tuple(ic.eval_pixels(processor, image).shape) == (3, 56, 56)
    assert tuple(processor(images=[image], return_tensors="pt")["pixel_values"].shape) == (1, 3, 56, 56)
    assert tuple(ic.synthetic_batch(processor, 2)["pixel_values"].shape) == (2, 3, 56, 56)


def test_without_settings_the_checkpoint_processor_is_kept(pretrained):
    from transformers import BitImageProcessor

    processor = ic.load_processor(ModelSection(name_or_path=str(pretrained)))
    assert isinstance(processor, BitImageProcessor) and ic.settings(processor).resize == 256


def test_a_config_built_model_takes_the_settings_too():
    model = ModelSection(config={"model_type": "vit", "image_size": 32},
                         processor={"size": {"height": 32, "width": 32}, "image_mean": [0.1, 0.2, 0.3]})
    settings = ic.settings(ic.load_processor(model))
    assert settings == st.ImageSettings((32, 32), (32, 32), "bilinear", (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))


def test_bicubic_settings_decode_bicubic(tmp_path):
    """The interpolation of the settings reaches the decoder (DINOv2 and timm models are bicubic)."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    bilinear = ic.image_cache.decode_one(image, (20, 20), draft=False, interpolation="bilinear")
    bicubic = ic.image_cache.decode_one(image, (20, 20), draft=False, interpolation="bicubic")
    expected = np.asarray(image.resize((20, 20), Image.BICUBIC), dtype=int)
    assert np.abs(bicubic.astype(int) - expected).mean() < np.abs(bilinear.astype(int) - expected).mean()


@pytest.mark.parametrize("settings", [
    st.ImageSettings((32, 32), 36, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    st.ImageSettings((56, 56), 64, "bilinear", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)),
    st.ImageSettings((224, 224), 256, "bicubic"),
    st.ImageSettings((40, 40), (40, 40), "bicubic"),
])
def test_a_timm_pretrained_cfg_carries_the_settings(settings):
    """Written into a timm model's config, timm's own data config gives the same transform back."""
    import timm.data

    cfg = st.timm_config_with({"input_size": [3, 224, 224], "crop_pct": 0.875, "num_classes": 1000}, settings)
    assert st.from_timm_config(timm.data.resolve_data_config(cfg)) == settings
