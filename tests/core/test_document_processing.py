"""Donut's and Nougat's image processors against transformers' on document-shaped images (within 1e-5).

Each case saves transformers' own processor to a folder and reads it with ``ImageProcessor.from_folder``, so the
config keys, the class names and the pixel values are all checked. The PIL path is what a folder naming
``DonutImageProcessor`` meant when it was saved; ``...Fast`` names the torchvision path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import splice
from splice.core.processing import DocumentImageProcessor, ImageProcessor

transformers = pytest.importorskip("transformers")
from transformers.models.donut.image_processing_donut import DonutImageProcessor  # noqa: E402
from transformers.models.donut.image_processing_pil_donut import DonutImageProcessorPil  # noqa: E402
from transformers.models.nougat.image_processing_nougat import NougatImageProcessor  # noqa: E402
from transformers.models.nougat.image_processing_pil_nougat import NougatImageProcessorPil  # noqa: E402

TOL = 1e-5
CLASSES = {("donut", "pil"): DonutImageProcessorPil, ("donut", "torchvision"): DonutImageProcessor,
           ("nougat", "pil"): NougatImageProcessorPil, ("nougat", "torchvision"): NougatImageProcessor}
SIZES = {"donut": {"height": 320, "width": 240}, "nougat": {"height": 224, "width": 168}}


def page(width: int, height: int, *, seed: int = 0, margin: float = 0.1, paper=(255, 255, 255)) -> Image.Image:
    """A document: lines of dark word-like strokes on paper, inside a margin."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(im)
    mx, my = max(1, int(width * margin)), max(1, int(height * margin))
    line = max(2, height // 40)
    for y in range(my, height - my - line, line):
        x = mx
        while x < width - mx - 3:
            word = int(rng.integers(2, max(3, width // 15)))
            ink = tuple(int(v) for v in rng.integers(0, 90, 3))
            draw.rectangle([x, y, min(x + word, width - mx), y + max(1, line // 2)], fill=ink)
            x += word + max(1, width // 80)
    return im


IMAGES = {"page": page(1700, 2200), "strip": page(300, 120, seed=1), "wide": page(2200, 900, seed=2),
          "tiny": page(64, 48, seed=3)}
FLAGS = {  # name -> settings on top of the family's defaults
    "defaults": {},
    "align_long_axis": {"do_align_long_axis": True},
    "no_pad": {"do_pad": False},
    "no_resize": {"do_resize": False},
    "bicubic": {"resample": 3},
    "nearest": {"resample": 0},
    "no_rescale": {"do_rescale": False},
    "no_normalize": {"do_normalize": False},
    "no_crop_margin": {"do_crop_margin": False},
}


def ours_from_transformers(theirs, folder, backend: str) -> ImageProcessor:
    theirs.save_pretrained(folder)
    if backend == "torchvision":  # transformers 5 saves both backends as DonutImageProcessor; Fast names this one
        f = folder / "preprocessor_config.json"
        d = json.loads(f.read_text())
        d["image_processor_type"] += "Fast"
        f.write_text(json.dumps(d))
    return ImageProcessor.from_folder(folder)


def max_diff(ours: ImageProcessor, theirs, image: Image.Image, *, their_image: Image.Image | None = None) -> float:
    want = theirs(their_image or image, return_tensors="pt")["pixel_values"]
    got = ours([image])
    assert got.shape == want.shape
    return (got - want).abs().max().item()


def _needs_turn(name: str) -> bool:
    return IMAGES[name].width > IMAGES[name].height  # every size here is portrait


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("family,backend", list(CLASSES))
def test_matches_transformers(family, backend, flags, tmp_path):
    settings = {"size": SIZES[family], **FLAGS[flags]}
    if family == "donut" and flags == "no_crop_margin":
        pytest.skip("Donut's processor has no margin crop")
    theirs = CLASSES[family, backend](**settings)
    ours = ours_from_transformers(theirs, tmp_path, backend)
    assert isinstance(ours, DocumentImageProcessor) and (ours.family, ours.backend) == (family, backend)
    for name, im in IMAGES.items():
        if flags == "align_long_axis" and family == "nougat" and backend == "torchvision" and _needs_turn(name):
            # transformers' torchvision Nougat turns the stacked batch about the wrong axes and fails; ours turns
            # the page, which is transformers on the page turned beforehand
            plain = CLASSES[family, backend](**{**settings, "do_align_long_axis": False})
            assert max_diff(ours, plain, im, their_image=im.transpose(Image.Transpose.ROTATE_270)) <= TOL
            continue
        try:
            theirs(im, return_tensors="pt")
        except ValueError:  # PIL path: the page does not fit size (a thumbnail alone can overshoot it)
            with pytest.raises(splice.InputError, match="do_pad cannot shrink it"):
                ours([im])
            continue
        assert max_diff(ours, theirs, im) <= TOL, (name, flags)


@pytest.mark.parametrize("family,backend", list(CLASSES))
def test_no_thumbnail(family, backend, tmp_path):
    """Without thumbnail a page larger than ``size`` cannot be padded: transformers' PIL path fails (splice says
    why), its torchvision path crops the overshoot, centred (so does splice)."""
    settings = {"size": SIZES[family], "do_thumbnail": False, "do_resize": False}
    theirs = CLASSES[family, backend](**settings)
    ours = ours_from_transformers(theirs, tmp_path, backend)
    assert max_diff(ours, theirs, IMAGES["tiny"]) <= TOL
    if backend == "torchvision":
        assert max_diff(ours, theirs, IMAGES["page"]) <= TOL
        return
    with pytest.raises(splice.InputError, match="(?s)do_pad cannot shrink it.*fix: set do_thumbnail: true"):
        ours([IMAGES["page"]])


@pytest.mark.parametrize("family,backend", list(CLASSES))
def test_grey_paper_transparency_and_tensors(family, backend, tmp_path):
    """Grey paper (the margin crop stretches the levels), a transparent PNG, a uint8 tensor, a page of one
    colour (nothing to crop)."""
    theirs = CLASSES[family, backend](size=SIZES[family])
    ours = ours_from_transformers(theirs, tmp_path, backend)
    grey = page(500, 700, seed=4, paper=(200, 205, 190))
    assert max_diff(ours, theirs, grey) <= TOL
    blank = Image.new("RGB", (120, 90), (240, 240, 240))
    assert max_diff(ours, theirs, blank) <= TOL
    rgba = page(300, 400, seed=5).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 128))
    assert max_diff(ours, theirs, rgba, their_image=_on_white(rgba)) <= TOL
    tensor = torch.from_numpy(np.array(IMAGES["strip"])).permute(2, 0, 1).contiguous()
    assert (ours([tensor]) - ours([IMAGES["strip"]])).abs().max().item() == 0


def _on_white(im: Image.Image) -> Image.Image:
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, im).convert("RGB")


def test_grayscale_pages_are_converted():
    """transformers' Donut/Nougat fail on a grayscale scan (do_convert_rgb unset); splice converts it to RGB."""
    proc = DocumentImageProcessor(size=SIZES["donut"])
    grey = IMAGES["strip"].convert("L")
    assert (proc([grey]) - proc([grey.convert("RGB")])).abs().max().item() == 0


@pytest.mark.parametrize("processor,family", [("DonutProcessor", "donut"), ("NougatProcessor", "nougat"),
                                              ("TrOCRProcessor", None)])
def test_combined_processor_config(processor, family, tmp_path):
    """transformers 5's processors save one processor_config.json with the image settings under
    "image_processor"; it is read, and wins over a preprocessor_config.json as in transformers."""
    from tokenizers import Tokenizer, models

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    if family is None:
        image_processor = transformers.ViTImageProcessor(size={"height": 48, "width": 32})
    else:
        # (transformers' torchvision Nougat fails to turn a wide page: see test_matches_transformers)
        image_processor = CLASSES[family, "torchvision"](size=SIZES[family], do_align_long_axis=family == "donut")
    getattr(transformers, processor)(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").is_file() and not (tmp_path / "preprocessor_config.json").exists()
    ImageProcessor(size={"height": 8, "width": 8}).save(tmp_path)  # a stale file the combined one overrides
    ours = ImageProcessor.from_folder(tmp_path)
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert type(theirs).__name__ == type(image_processor).__name__
    if family is not None:
        assert (ours.family, ours.do_align_long_axis) == (family, family == "donut")
        ours.backend = "torchvision"  # transformers 5 builds the torchvision one from this name; compare with it
    for im in (IMAGES["strip"], IMAGES["page"]):
        assert max_diff(ours, theirs, im) <= TOL


def test_combined_file_without_image_settings_falls_back(tmp_path):
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "TrOCRProcessor"}))
    assert ImageProcessor.from_folder(tmp_path) is None
    ImageProcessor(size={"height": 8, "width": 8}).save(tmp_path)
    assert ImageProcessor.from_folder(tmp_path).size == {"height": 8, "width": 8}


@pytest.mark.parametrize("family,backend", list(CLASSES))
def test_round_trip(family, backend, tmp_path):
    """save then from_folder gives the same processor and pixels; transformers reads the file as the same
    processor with the same settings."""
    turn = (family, backend) != ("nougat", "torchvision")  # transformers fails to turn there
    ours = DocumentImageProcessor(family=family, backend=backend, size={"height": 200, "width": 150},
                                  do_align_long_axis=turn, do_crop_margin=family == "nougat", resample=3)
    ours.save(tmp_path)
    again = ImageProcessor.from_folder(tmp_path)
    assert again == ours
    assert (again([IMAGES["wide"]]) - ours([IMAGES["wide"]])).abs().max().item() == 0
    theirs = CLASSES[family, backend].from_pretrained(tmp_path)
    auto = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert type(auto).__name__ == f"{family.capitalize()}ImageProcessor"
    assert (theirs.size.height, theirs.size.width, theirs.resample) == (200, 150, 3)
    assert theirs.do_align_long_axis == turn and getattr(theirs, "do_crop_margin", False) == (family == "nougat")
    for name in ("page", "tiny"):
        assert max_diff(again, theirs, IMAGES[name]) <= TOL


def test_old_donut_config_keys(tmp_path):
    """A 2022 Donut folder: feature_extractor_type and a [width, height] size list."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "DonutFeatureExtractor", "size": [240, 320], "do_thumbnail": True,
        "do_align_long_axis": False, "do_pad": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "resample": 2, "processor_class": "DonutProcessor"}))
    ours = ImageProcessor.from_folder(tmp_path)
    assert (ours.family, ours.backend, ours.size) == ("donut", "pil", {"height": 320, "width": 240})
    theirs = DonutImageProcessorPil(size=[240, 320])
    assert max_diff(ours, theirs, IMAGES["page"]) <= TOL


@pytest.mark.parametrize("field,value,message", [
    ("size", {"shortest_edge": 224}, r"size: not an image size.*height, width"),
    ("size", [0, 320], r"size.(width|height): not an image side"),
    ("do_thumbnail", "yes", r"do_thumbnail: not a boolean"),
    ("do_pad", 1, r"do_pad: not a boolean"),
    ("do_align_long_axis", [], r"do_align_long_axis: not a boolean"),
    ("do_crop_margin", "no", r"do_crop_margin: not a boolean"),
    ("resample", 9, r"resample: not a PIL resampling code"),
    ("image_std", [0.5, 0, 0.5], r"image_std: not one number per channel"),
])
@pytest.mark.parametrize("kind", ["NougatImageProcessor", "DonutImageProcessorFast"])
def test_bad_values_are_clean_errors(kind, field, value, message, tmp_path):
    settings = {"image_processor_type": kind, "size": {"height": 64, "width": 48}, field: value}
    if kind.startswith("Donut") and field == "do_crop_margin":
        settings[field] = True  # Donut does not read it; a direct setting is refused instead
        with pytest.raises(splice.ConfigError, match="do_crop_margin: Donut's processor does not crop margins"):
            DocumentImageProcessor(family="donut", do_crop_margin=True)
        return
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": settings}))
    with pytest.raises(splice.CheckpointError, match=message) as err:
        ImageProcessor.from_folder(tmp_path)
    assert "processor_config.json (image_processor)" in str(err.value) and "fix" in str(err.value)


def test_bad_files_and_settings(tmp_path):
    (tmp_path / "processor_config.json").write_text("[1, 2]")
    with pytest.raises(splice.CheckpointError, match="processor_config.json: a JSON list"):
        ImageProcessor.from_folder(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": "DonutImageProcessor"}))
    with pytest.raises(splice.CheckpointError, match="a JSON str, expected an object"):
        ImageProcessor.from_folder(tmp_path)
    (tmp_path / "processor_config.json").unlink()
    (tmp_path / "processor_config.json").mkdir()
    with pytest.raises(splice.CheckpointError, match="not a regular file"):
        ImageProcessor.from_folder(tmp_path)
    with pytest.raises(splice.ConfigError) as err:
        DocumentImageProcessor(family="pdf", backend="opencv", do_pad="no")
    assert {p.path for p in err.value.problems} >= {"family", "backend", "do_pad"}


def test_extreme_pages_are_refused():
    proc = DocumentImageProcessor(size={"height": 2560, "width": 1920})
    with pytest.raises(splice.InputError, match="less extreme aspect ratio"):
        proc([Image.new("RGB", (1, 9000), "white")])
    thin = DocumentImageProcessor(size={"height": 64, "width": 48}, do_resize=False)
    with pytest.raises(splice.InputError, match="less extreme aspect ratio"):
        thin([Image.new("RGB", (5000, 2), "white")])
