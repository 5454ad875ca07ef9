"""The demo's pipeline on a tiny stand-in model and stand-in photos: no torch, no network."""
import importlib.util

import numpy as np
import onnx
import pytest

from pyquant import demo
from pyquant.cli import main

from conftest import tiny_cnn


def stand_in_photos():
    rng = np.random.default_rng(0)
    return {"wide": rng.integers(0, 255, (30, 50, 3), dtype=np.uint8),
            "tall": rng.integers(0, 255, (40, 20, 3), dtype=np.uint8)}


def test_crop_shape_normalisation_and_position():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 30:] = 255  # right half white
    left = demo.crop(image, 16, 0.5, 0.5, 0.2, (0.5,) * 3, (0.5,) * 3)
    right = demo.crop(image, 16, 0.5, 0.5, 0.8, (0.5,) * 3, (0.5,) * 3)
    assert left.shape == (3, 16, 16) and left.dtype == np.float32
    np.testing.assert_allclose(left, -1.0)
    np.testing.assert_allclose(right, 1.0)


def test_calibration_set_has_every_crop_and_its_mirror():
    calib = demo.calibration_set(stand_in_photos(), 16, (0.5,) * 3, (0.5,) * 3)
    assert calib.shape == (2 * 2 * len(demo.CALIBRATION_CROPS), 3, 16, 16)
    np.testing.assert_array_equal(calib[1], calib[0][:, :, ::-1])


def test_run_demo_on_stand_in(tmp_path):
    def build(path):
        onnx.save(tiny_cnn(), path)
        return path

    result = demo.run_demo(tmp_path, build=build, photos=stand_in_photos, class_name=lambda i: f"class{i}",
                           input_size=16)
    assert set(result.predictions) == {"wide", "tall"}
    for float_top5, quant_top5 in result.predictions.values():
        assert len(float_top5) == len(quant_top5) == 5 and float_top5[0].startswith("class")
    assert result.quantized_size_mb > 0 and (tmp_path / "efficientnet_lite0_xint8.onnx").exists()
    assert "top-5" in demo.format_result(result)


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image not installed")
def test_scikit_image_photos_are_rgb():
    photos = demo.scikit_image_photos()
    assert len(photos) >= 5
    assert all(p.ndim == 3 and p.shape[2] == 3 and p.dtype == np.uint8 for p in photos.values())


def test_demo_without_extras_says_what_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert main(["demo", "--quiet"]) == 2
    assert "pip install 'pyquant[demo]'" in capsys.readouterr().err
