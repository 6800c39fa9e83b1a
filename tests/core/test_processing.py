"""Our image processor against transformers' on the same images (within 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import splice
from splice.core.processing import ImageProcessor

transformers = pytest.importorskip("transformers")


def _images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)),  # landscape
        Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)),  # portrait
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),  # upscaled
    ]


@pytest.mark.parametrize("cls,kwargs", [
    ("ViTImageProcessor", {}),
    ("ViTImageProcessor", {"size": {"height": 32, "width": 48}, "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}),
    ("DeiTImageProcessor", {}),  # resize 256 then centre crop 224
    ("BeitImageProcessor", {}),
])
def test_matches_transformers(cls, kwargs, tmp_path):
    theirs = getattr(transformers, cls)(**kwargs)
    theirs.save_pretrained(tmp_path)
    ours = ImageProcessor.from_folder(tmp_path)
    for im in _images():
        want = theirs(images=im, return_tensors="pt")["pixel_values"]
        got = ours([im])
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5


def test_from_encoder_preprocessing_and_round_trip(tmp_path):
    model = splice.compose("vit-gpt2-tiny")
    proc = ImageProcessor.from_preprocessing(model.encoder.preprocessing)
    grey = Image.fromarray(np.zeros((40, 40), dtype=np.uint8))  # converted to RGB
    px = proc(_images() + [grey])
    assert px.shape == (4, 3, 32, 32)
    proc.save(tmp_path)
    assert ImageProcessor.from_folder(tmp_path) == proc


def test_bad_images(tmp_path):
    proc = ImageProcessor()
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(splice.InputError, match="x.png.*not a readable image"):
        proc([bad])
    with pytest.raises(splice.InputError, match="no such image"):
        proc([tmp_path / "missing.png"])
