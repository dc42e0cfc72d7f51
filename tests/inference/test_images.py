from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_cli.errors import UserInputError
from lora_cli.tasks.data.images import ImageLoadError, expand_inputs, load_image
from tests.inference.images_fixture import make_user_images


@pytest.fixture
def user_images(tmp_path):
    return make_user_images(tmp_path / "photos")


def test_every_mode_becomes_rgb(user_images):
    for kind in ("jpeg", "alpha", "gray", "exif"):
        img = load_image(user_images[kind])
        assert img.mode == "RGB", kind


def test_exif_orientation_is_applied(user_images):
    img = load_image(user_images["exif"])
    assert img.size == (20, 40)  # stored 40x20, displayed rotated
    top = np.asarray(img)[1, 10]  # the blue left strip is now along the top
    assert top[2] > 200 and top[0] < 60


def test_transparency_is_composited_on_white(user_images):
    arr = np.asarray(load_image(user_images["alpha"]))
    assert (arr[:, :16] == 255).all()  # transparent (black underneath) -> white
    assert not (arr[:, 16:] == 255).all()


def test_palette_cmyk_and_16bit_grey(tmp_path):
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.paste(1, (0, 0, 4, 8))
    pal.save(tmp_path / "p.png")
    assert tuple(np.asarray(load_image(tmp_path / "p.png"))[0, 0]) == (10, 200, 30)

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    red = np.asarray(load_image(tmp_path / "c.jpg"))[4, 4]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60

    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    deep.save(tmp_path / "g16.png")
    assert (np.asarray(load_image(tmp_path / "g16.png")) == 255).all()


def test_corrupt_and_non_image_files_name_the_file(user_images, tmp_path):
    with pytest.raises(ImageLoadError, match=r"e_corrupt\.jpg: corrupt or truncated"):
        load_image(user_images["corrupt"])
    text = tmp_path / "x.jpg"
    text.write_text("hello")
    with pytest.raises(ImageLoadError, match=r"x\.jpg: not an image file"):
        load_image(text)
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "missing.png")
    assert issubclass(ImageLoadError, UserInputError)


def test_decompression_bomb_is_refused(tmp_path):
    Image.new("L", (200, 200)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(tmp_path / "big.png", max_pixels=100 * 100)


def test_pillow_bomb_warning_is_an_error(tmp_path, monkeypatch):
    Image.new("L", (200, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # 40,000 px: warning zone
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(tmp_path / "big.png")


def test_expand_inputs_folders_globs_files(user_images, tmp_path):
    folder = user_images["jpeg"].parent
    files = expand_inputs([folder])
    assert [f.name for f in files] == ["a_photo.jpg", "b_alpha.png", "c_gray.png", "d_rotated.jpg", "e_corrupt.jpg"]
    assert [f.name for f in expand_inputs([str(folder / "*.png")])] == ["b_alpha.png", "c_gray.png"]
    assert expand_inputs([user_images["gray"], folder / "notes.txt", user_images["gray"]]) == [
        user_images["gray"], folder / "notes.txt"
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no image files found in .*empty"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(UserInputError, match="no such file or folder: .*nope.jpg"):
        expand_inputs([tmp_path / "nope.jpg"])
    with pytest.raises(UserInputError, match="no image files found"):
        expand_inputs([str(tmp_path / "*.gif")])


def test_transparency_of_palette_and_grey_images_is_composited_on_white(tmp_path):
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.paste(1, (0, 0, 4, 8))
    pal.save(tmp_path / "p.png", transparency=0)
    arr = np.asarray(load_image(tmp_path / "p.png"))
    assert tuple(arr[0, 0]) == (10, 200, 30) and (arr[:, 4:] == 255).all()
    Image.new("L", (8, 8), 0).save(tmp_path / "l.png", transparency=0)
    assert (np.asarray(load_image(tmp_path / "l.png")) == 255).all()


def test_expand_inputs_does_not_loop_on_symlinks(tmp_path):
    import os

    folder = tmp_path / "pics"
    (folder / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(folder / "a" / "x.png")
    Image.new("RGB", (4, 4)).save(folder / "a" / "b" / "y.png")
    os.symlink("..", folder / "a" / "b" / "up")  # two loops: exponential for glob.glob's **
    os.symlink("../..", folder / "a" / "b" / "top")
    expected = [folder / "a" / "b" / "y.png", folder / "a" / "x.png"]
    assert expand_inputs([folder]) == expected
    assert expand_inputs([str(folder / "**" / "*.png")]) == expected
