"""PNG outputs: grid geometry and pixel values, scatter and curve files open with PIL."""

import numpy as np
import pytest
import torch
from PIL import Image

from sct.images import PAD_VALUE, save_curve, save_image_grid, save_scatter


def test_grid_tiny_images_upscaled_with_known_pixels(tmp_path):
    imgs = torch.cat([-torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8)])  # black, black, white, white
    path = tmp_path / "g" / "grid.png"
    save_image_grid(imgs, path)  # nrow defaults to 2; k = ceil(256 / 16) = 16; 1 px separators
    img = Image.open(path)
    assert img.mode == "RGB"
    assert img.size == (2 * (8 * 16 + 1) + 1, 2 * (8 * 16 + 1) + 1)
    a = np.asarray(img)
    tile = 8 * 16
    assert (a[1 : 1 + tile, 1 : 1 + tile] == 0).all()  # first image: all -1 -> black
    second_row = 1 + tile + 1
    assert (a[second_row : second_row + tile, 1 : 1 + tile] == 255).all()  # third image: +1 -> white
    assert (a[0] == PAD_VALUE).all() and (a[:, tile + 1] == PAD_VALUE).all()


def test_grid_grayscale_values_clamp_and_layout(tmp_path):
    x = -torch.ones(5, 1, 40, 50)
    x[0] = 0.0  # mid grey in [-1, 1]
    x[1] = 5.0  # clamped to white
    x[2] = -5.0  # clamped to black
    path = tmp_path / "gray.png"
    save_image_grid(x, path, nrow=3)  # k = ceil(256 / 150) = 2; 2 px separators; 2 rows
    img = Image.open(path)
    assert img.mode == "L"
    assert img.size == (3 * (100 + 2) + 2, 2 * (80 + 2) + 2)
    a = np.asarray(img)
    assert a[2 + 40, 2 + 50] in (127, 128)
    assert a[2 + 40, 2 + 102 + 50] == 255
    assert a[2 + 40, 2 + 2 * 102 + 50] == 0
    assert (a[2 + 82 + 40, 2 + 2 * 102 : -2] == PAD_VALUE).all()  # the empty sixth slot


def test_grid_value_range_and_big_images_not_upscaled(tmp_path):
    x = torch.full((1, 3, 300, 320), 0.5)
    save_image_grid(x, tmp_path / "u.png", value_range=(0.0, 1.0))
    a = np.asarray(Image.open(tmp_path / "u.png"))
    assert a.shape == (304, 324, 3) and a[150, 160, 0] in (127, 128)


def test_grid_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError, match="expected images"):
        save_image_grid(torch.zeros(2, 2, 8, 8), tmp_path / "x.png")


def test_scatter_and_curve_pngs(tmp_path):
    rng = np.random.default_rng(0)
    pts = {"data": rng.normal(size=(200, 2)), "model": torch.randn(300, 2) * 2}
    save_scatter(pts, tmp_path / "s" / "scatter.png", title="2-D")
    save_curve({"loss": [1.0, 0.5, 0.25, 0.2], "ema": np.linspace(1, 0.3, 10)}, tmp_path / "c.png", logy=True)
    for p in (tmp_path / "s" / "scatter.png", tmp_path / "c.png"):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    with Image.open(tmp_path / "s" / "scatter.png") as im:
        assert im.size[0] > im.size[1]  # two panels side by side
    with pytest.raises(ValueError, match="model"):
        save_scatter({"model": np.zeros((4, 3))}, tmp_path / "bad.png")
