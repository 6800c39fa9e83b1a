"""Images in, pixel_values out: the encoder's preprocessing, compatible with transformers' preprocessor_config.json.

The steps follow transformers' torchvision image processors (resize a uint8 tensor with antialiasing, centre
crop, then one fused rescale+normalise), so the same image gives the same pixel values. Donut's and Nougat's
processors (``DocumentImageProcessor``: keep the aspect ratio, thumbnail, pad, align the long axis, crop the
margin) follow transformers' PIL path, or its torchvision one for a folder naming the ``...Fast`` class. The
settings are read from a combined ``processor_config.json`` (its ``image_processor`` object, what transformers 5
saves) or from ``preprocessor_config.json``.

Bounds. An image file is read only when it is a regular file (a FIFO, a folder or a device is refused without
being opened for reading) and declares at most ``MAX_IMAGE_PIXELS`` pixels (PIL's own warning bound, about
9,459 x 9,459: larger is treated as a decompression bomb). A processor's sizes are at most ``MAX_SIDE`` pixels a
side, and so is every resized image (a document processor's intermediate resize: at most ``MAX_IMAGE_PIXELS``
pixels). A bad value in ``preprocessor_config.json`` is a ``CheckpointError`` naming
the file and the field when the model is loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from splice.core.errors import CheckpointError, ConfigError, InputError, Problem, short
from splice.core.interfaces import Preprocessing

# PIL's resampling codes (what preprocessor_config.json stores) -> torchvision's modes
_PIL_TO_MODE = {0: "NEAREST_EXACT", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
_NAME_TO_PIL = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
FILE = "preprocessor_config.json"
COMBINED_FILE = "processor_config.json"  # a transformers 5 processor's save: image settings under "image_processor"
MAX_IMAGE_PIXELS = 89_478_485  # width x height of an image file; PIL's DecompressionBombWarning bound
MAX_SIDE = 8192  # pixels: the largest size / crop_size a processor takes, and the longest side it resizes to
MAX_CONFIG_BYTES = 1 << 20  # a preprocessor_config.json larger than this is not one
_SIZE_KEYS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"})
_FLAGS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")


@dataclass
class ImageProcessor:
    size: dict = field(default_factory=lambda: {"height": 224, "width": 224})  # or {"shortest_edge": n}
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = False
    crop_size: dict | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True

    _size_keys = _SIZE_KEYS  # the forms of `size` this processor takes
    _flags = _FLAGS  # its boolean fields

    def __post_init__(self) -> None:
        """Check every field (all problems at once, a ``ConfigError``) and normalise the accepted shorthands:
        an int size is a square, a single mean/std number applies to every channel."""
        problems: list[Problem] = []
        self._check(problems)
        if problems:
            raise ConfigError(problems, source="the image processor settings")

    def _check(self, problems: list[Problem]) -> None:
        self.size = _sizes("size", self.size, self._size_keys, problems)
        if self.crop_size is not None:
            self.crop_size = _sizes("crop_size", self.crop_size, _SIZE_KEYS[:1], problems)
        if type(self.resample) is not int or self.resample not in _PIL_TO_MODE:
            problems.append(Problem("resample", "not a PIL resampling code", given=self.resample,
                                    expected="0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box or 5 hamming",
                                    fix="use 2 (bilinear) or 3 (bicubic), what ViT processors use"))
        for name in self._flags:
            if not isinstance(getattr(self, name), bool):
                problems.append(Problem(name, "not a boolean", given=getattr(self, name), expected="true or false",
                                        fix=f"write {name}: true or false"))
        rf = self.rescale_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not math.isfinite(rf) or rf <= 0:
            problems.append(Problem("rescale_factor", "not a positive scale", given=rf,
                                    expected="a finite number > 0", fix="use 0.00392156862745098 (1/255)"))
        channels = (3,) if self.do_convert_rgb is True else (1, 3)
        self.image_mean = _per_channel("image_mean", self.image_mean, channels, problems, positive=False)
        self.image_std = _per_channel("image_std", self.image_std, channels, problems, positive=True)

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_preprocessing(cls, p: Preprocessing) -> "ImageProcessor":
        """From an encoder's data config (timm style: resize the short side to size / crop_pct, then crop)."""
        h, w = p.image_size
        resample = _NAME_TO_PIL.get(p.interpolation, 3)
        common = dict(resample=resample, image_mean=tuple(p.mean), image_std=tuple(p.std), do_convert_rgb=p.in_chans == 3)
        if not p.crop_pct or p.crop_pct >= 1.0 or h != w:
            return cls(size={"height": h, "width": w}, **common)
        return cls(size={"shortest_edge": int(h / p.crop_pct)}, do_center_crop=True,
                   crop_size={"height": h, "width": w}, **common)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "preprocessor config") -> "ImageProcessor":
        """From a transformers ``preprocessor_config.json`` (ViT, DeiT, BEiT, Swin image processors; Donut's and
        Nougat's give a ``DocumentImageProcessor``). A bad value is a ``CheckpointError`` naming ``source`` and the
        field; a missing or null one takes the default."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: a JSON {type(d).__name__}, expected an object of image processor "
                                  "settings\n    fix: save the processor again, or delete the file (the encoder's "
                                  "own preprocessing is then used)")
        document = _document_kind(d)
        if document is not None:
            return DocumentImageProcessor.from_settings(d, *document, source=source)
        crop = _get(d, "crop_size", None)
        try:
            return cls(size=_get(d, "size", {"height": 224, "width": 224}),
                       do_center_crop=_get(d, "do_center_crop", False) if crop is not None else False,
                       crop_size=crop, **_common_settings(d, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
        except ConfigError as exc:
            raise CheckpointError(exc.problems, source=source) from None

    @classmethod
    def from_folder(cls, folder: Path) -> "ImageProcessor | None":
        """The folder's image processor: the ``image_processor`` object of a combined ``processor_config.json``
        (what transformers 5's processors save; it wins, as in transformers), else ``preprocessor_config.json``;
        None when neither holds one."""
        combined = _config_file(Path(folder) / COMBINED_FILE)
        if combined is not None:
            settings = _read_config(combined)
            if not isinstance(settings, dict):
                raise CheckpointError(f"{combined}: a JSON {type(settings).__name__}, expected an object (a "
                                      "processor's settings)\n    fix: save the processor again, or delete the file")
            if "image_processor" in settings:
                return cls.from_dict(settings["image_processor"], source=f"{combined} (image_processor)")
        f = _config_file(Path(folder) / FILE)
        return None if f is None else cls.from_dict(_read_config(f), source=str(f))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_processor_type"] = "ViTImageProcessor"
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    def save(self, folder: Path) -> None:
        (Path(folder) / FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # -- use ------------------------------------------------------------------------------------------
    def __call__(self, images: Sequence[Any]) -> Tensor:
        """PIL images, paths or uint8 (C, H, W) tensors -> pixel_values (B, C, H, W) float32."""
        if not images:
            raise InputError("no images given\n    fix: pass a list of at least one image (path, PIL image or tensor)")
        return torch.stack([self.one(im) for im in images])

    def one(self, image: Any) -> Tensor:
        """One image -> (C, H, W) float32; an image that cannot be used is an ``InputError`` naming it."""
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as tvF

        x = _to_uint8_tensor(image, rgb=self.do_convert_rgb)  # (C, H, W) uint8
        self._check_channels(x, image)
        if self.do_resize:
            mode = getattr(v2.InterpolationMode, _PIL_TO_MODE[self.resample])
            x = tvF.resize(x, self._resized_hw(x, image), interpolation=mode, antialias=True)
        if self.do_center_crop and self.crop_size:
            ch, cw = self.crop_size["height"], self.crop_size["width"]
            x = tvF.center_crop(x, [ch, cw])
        return self._scale(x.to(torch.float32))

    def _scale(self, x: Tensor) -> Tensor:
        """Rescale and normalise float32 pixels as transformers' torchvision processors do."""
        from torchvision.transforms.v2 import functional as tvF

        if self.do_rescale and self.do_normalize:  # one fused step, as transformers does
            mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
            return tvF.normalize(x, mean.tolist(), std.tolist())
        if self.do_normalize:
            return tvF.normalize(x, list(self.image_mean), list(self.image_std))
        if self.do_rescale:
            return x * self.rescale_factor
        return x

    def _check_channels(self, x: Tensor, image: Any) -> None:
        c = x.shape[0]
        if self.do_normalize and any(len(v) not in (1, c) for v in (self.image_mean, self.image_std)):
            raise InputError(
                f"{_name(image)}: {c} channel(s), but the processor normalises {len(self.image_mean)} "
                f"(image_mean {list(self.image_mean)})\n    fix: give {len(self.image_mean)}-channel images, "
                "or set do_convert_rgb: true in preprocessor_config.json")

    def _resized_hw(self, x: Tensor, image: Any = None) -> list[int]:
        if "height" in self.size:
            return [self.size["height"], self.size["width"]]
        h, w = x.shape[-2:]
        short = self.size["shortest_edge"]
        long = int(short * max(h, w) / min(h, w))
        cap = self.size.get("longest_edge")
        if cap is not None and long > cap:  # transformers' max_size: shrink so the long side fits
            short, long = max(1, int(cap * short / long)), cap
        if long > MAX_SIDE:
            raise InputError(
                f"{_name(image)}: {w}x{h} pixels; resizing its short side to {short} would make the long side "
                f"{long:,} pixels (more than {MAX_SIDE:,})\n    fix: crop the image to a less extreme aspect "
                "ratio, or give the processor a size with height and width")
        return [short, long] if h <= w else [long, short]


# -- documents: Donut and Nougat -----------------------------------------------------------------------------
_DOCUMENT_DEFAULTS = {  # transformers' class defaults: size, image_mean, image_std
    "donut": ({"height": 2560, "width": 1920}, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "nougat": ({"height": 896, "width": 672}, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_BACKENDS = ("pil", "torchvision")
_DOCUMENT_TYPE = re.compile(r"(Donut|Nougat)(?:ImageProcessor|FeatureExtractor)(Fast|Pil)?")


@dataclass
class DocumentImageProcessor(ImageProcessor):
    """Donut's and Nougat's image processors: a page keeps its aspect ratio and is padded to ``size``.

    The steps, each behind its flag as in transformers: crop the white margin (Nougat), turn the page a quarter
    clockwise when its long axis differs from ``size``'s (``do_align_long_axis``), resize its short side to the
    shorter side of ``size``, shrink it to fit inside ``size`` (``do_thumbnail``), pad it to ``size`` with zeros,
    centred (``do_pad``; transformers' random padding is a training option and is not read), rescale, normalise.
    ``backend`` picks whose arithmetic: ``"pil"`` (transformers' PIL path, what a folder naming
    ``DonutImageProcessor`` meant when it was saved) or ``"torchvision"`` (the ``...Fast`` processors); the two
    differ by one grey level along edges, so each is matched to its own.
    """

    size: dict = field(default_factory=lambda: dict(_DOCUMENT_DEFAULTS["donut"][0]))
    resample: int = 2
    family: str = "donut"  # "donut" | "nougat"
    backend: str = "pil"  # "pil" | "torchvision"
    do_thumbnail: bool = True
    do_align_long_axis: bool = False
    do_pad: bool = True
    do_crop_margin: bool = False  # Nougat's; transformers' NougatImageProcessor defaults it to true

    _size_keys = _SIZE_KEYS[:1]
    _flags = _FLAGS + ("do_thumbnail", "do_align_long_axis", "do_pad", "do_crop_margin")

    def _check(self, problems: list[Problem]) -> None:
        super()._check(problems)
        if self.family not in _DOCUMENT_DEFAULTS:
            problems.append(Problem("family", "not a document processor", given=self.family,
                                    expected="donut or nougat", fix="write family: donut"))
        if self.backend not in _BACKENDS:
            problems.append(Problem("backend", "not an image backend", given=self.backend,
                                    expected="pil or torchvision", fix="write backend: pil"))
        if self.family == "donut" and self.do_crop_margin is True:
            problems.append(Problem("do_crop_margin", "Donut's processor does not crop margins", given=True,
                                    expected="false for donut", fix="set do_crop_margin: false, or use family: nougat"))

    @classmethod
    def from_settings(cls, d: dict, family: str, backend: str, *, source: str) -> "DocumentImageProcessor":
        """From a transformers Donut/Nougat processor config; a bad value is a ``CheckpointError``."""
        size, mean, std = _DOCUMENT_DEFAULTS[family]
        size = _get(d, "size", size)
        if isinstance(size, (list, tuple)) and len(size) == 2:  # Donut's list is (width, height), Nougat's not
            size = dict(zip(("width", "height") if family == "donut" else ("height", "width"), size))
        crop = _get(d, "crop_size", None) if family == "donut" else None  # Nougat's processor never crops
        try:
            return cls(family=family, backend=backend, size=size, crop_size=crop,
                       do_center_crop=_get(d, "do_center_crop", False) if crop is not None else False,
                       do_thumbnail=_get(d, "do_thumbnail", True), do_pad=_get(d, "do_pad", True),
                       do_align_long_axis=_get(d, "do_align_long_axis", False),
                       do_crop_margin=_get(d, "do_crop_margin", True) if family == "nougat" else False,
                       **_common_settings(d, mean, std))
        except ConfigError as exc:
            raise CheckpointError(exc.problems, source=source) from None

    def to_dict(self) -> dict:
        """The settings as transformers writes them, named so that it builds the same processor."""
        d = {k: v for k, v in asdict(self).items() if k not in ("family", "backend", "crop_size", "do_center_crop")}
        d["image_processor_type"] = ("Nougat" if self.family == "nougat" else "Donut") + "ImageProcessor" + (
            "Fast" if self.backend == "torchvision" else "")
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        if self.family == "donut":
            del d["do_crop_margin"]
            if self.crop_size is not None:
                d.update(crop_size=self.crop_size, do_center_crop=self.do_center_crop)
        return d

    def one(self, image: Any) -> Tensor:
        """One page -> (C, size.height, size.width) float32 (without do_pad: the resized page)."""
        from torchvision.transforms.v2 import functional as tvF

        x = _to_uint8_tensor(image, rgb=self.do_convert_rgb)  # (C, H, W) uint8
        self._check_channels(x, image)
        target = (self.size["height"], self.size["width"])
        if self.do_crop_margin:
            x = self._crop_margin(x)
        h, w = x.shape[-2:]
        if self.do_align_long_axis and (target[1] < target[0] and w > h or target[1] > target[0] and w < h):
            x = torch.rot90(x, 3, dims=[1, 2])  # a quarter turn clockwise, as transformers does
        if self.do_resize:
            x = self._resize(x, _short_side_to(x, min(target), image), self.resample, image)
        if self.do_thumbnail:
            x = self._thumbnail(x, target, image)
        if self.do_pad and self.backend == "torchvision":  # transformers' torchvision pad crops what overshoots
            x = _pad_centred(x, target, image, None)
        elif self.do_pad:  # its PIL pad fails there
            x = _pad_centred(x, target, image, "set do_resize: true (a thumbnail alone can overshoot size by a few "
                             "pixels, as in transformers)" if self.do_thumbnail else "set do_thumbnail: true")
        if self.family == "donut" and self.do_center_crop and self.crop_size:
            x = tvF.center_crop(x, [self.crop_size["height"], self.crop_size["width"]])
        if self.backend == "torchvision":
            return self._scale(x.to(torch.float32))
        if self.do_rescale:  # numpy's arithmetic in transformers' PIL path: float64 product, then float32
            x = (x.to(torch.float64) * self.rescale_factor).to(torch.float32)
        x = x.to(torch.float32)
        if self.do_normalize:
            mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (self.image_mean, self.image_std))
            x = (x - mean) / std
        return x

    def _crop_margin(self, x: Tensor) -> Tensor:
        """Nougat's margin crop: the bounding box of the pixels darker than 200 once the grey levels are stretched
        to 0..255 (a page of one grey level is kept whole). PIL's or torchvision's grey, as the backend says."""
        import numpy as np

        if self.backend == "pil":
            gray = np.array(_to_pil(x).convert("L")).astype(np.uint8)
            lo, hi = gray.min(), gray.max()
            if lo == hi:
                return x
            dark = torch.from_numpy((gray - lo) / (hi - lo) * 255 < 200)
        else:
            from torchvision.transforms.v2 import functional as tvF

            gray = tvF.rgb_to_grayscale(x, num_output_channels=1)
            lo, hi = torch.min(gray), torch.max(gray)
            if lo == hi:
                return x
            dark = ((gray - lo) / (hi - lo) * 255 < 200)[0]
        ys, xs = dark.any(dim=1).nonzero()[:, 0], dark.any(dim=0).nonzero()[:, 0]
        return x[:, int(ys[0]):int(ys[-1]) + 1, int(xs[0]):int(xs[-1]) + 1]

    def _thumbnail(self, x: Tensor, target: tuple[int, int], image: Any) -> Tensor:
        """Shrink to fit inside ``target`` keeping the aspect ratio (never enlarges), as transformers' thumbnail."""
        h, w = x.shape[-2:]
        th, tw = min(h, target[0]), min(w, target[1])
        if (th, tw) == (h, w):
            return x
        if h > w:
            tw = int(w * th / h)
        elif w > h:
            th = int(h * tw / w)
        if self.family == "nougat":  # bicubic whatever resample says; PIL path with reducing_gap 2
            return self._resize(x, [th, tw], 3, image, reducing_gap=2.0)
        resample = (self.resample or 3) if self.backend == "pil" else self.resample  # PIL path: nearest (0) -> bicubic
        return self._resize(x, [th, tw], resample, image)

    def _resize(self, x: Tensor, hw: list[int], resample: int, image: Any, reducing_gap: float | None = None) -> Tensor:
        if min(hw) < 1:
            raise InputError(f"{_name(image)}: {x.shape[-1]}x{x.shape[-2]} pixels would be resized to {hw[1]}x{hw[0]}"
                             "\n    fix: crop the image to a less extreme aspect ratio")
        if self.backend == "torchvision":
            from torchvision.transforms import v2
            from torchvision.transforms.v2 import functional as tvF

            mode = getattr(v2.InterpolationMode, _PIL_TO_MODE[resample])
            return tvF.resize(x, hw, interpolation=mode, antialias=True)
        im = _to_pil(x).resize((hw[1], hw[0]), resample=resample, reducing_gap=reducing_gap)
        return _from_pil(im)


def _document_kind(d: dict) -> tuple[str, str] | None:
    """(family, backend) when the settings name Donut's or Nougat's processor (or old feature extractor)."""
    name = d.get("image_processor_type")
    if name is None:
        name = d.get("feature_extractor_type")
    match = _DOCUMENT_TYPE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        return None
    return match[1].lower(), "torchvision" if match[2] == "Fast" else "pil"


def _short_side_to(x: Tensor, short: int, image: Any) -> list[int]:
    """transformers' shortest-edge size: the short side becomes ``short``, the long one follows (truncated)."""
    h, w = x.shape[-2:]
    long = int(short * max(h, w) / min(h, w))
    if short * long > MAX_IMAGE_PIXELS:
        raise InputError(f"{_name(image)}: {w}x{h} pixels; resizing its short side to {short} would make "
                         f"{short:,}x{long:,} pixels (more than {MAX_IMAGE_PIXELS:,})\n    fix: crop the image to a "
                         "less extreme aspect ratio, or set do_resize: false (do_thumbnail then fits it)")
    return [long, short] if w <= h else [short, long]


def _pad_centred(x: Tensor, target: tuple[int, int], image: Any, fix: str | None) -> Tensor:
    """Zeros around ``x`` to make it ``target``, centred; a side that overshoots is cropped (centred) when
    ``fix`` is None, else an ``InputError`` with that fix."""
    from torchvision.transforms.v2 import functional as tvF

    dh, dw = target[0] - x.shape[-2], target[1] - x.shape[-1]
    if fix is not None and (dh < 0 or dw < 0):
        raise InputError(f"{_name(image)}: {x.shape[-1]}x{x.shape[-2]} pixels once resized, larger than the "
                         f"processor's size {target[1]}x{target[0]} (width x height), and do_pad cannot shrink it"
                         f"\n    fix: {fix} in the processor config")
    top, left = dh // 2, dw // 2
    return tvF.pad(x, [left, top, dw - left, dh - top], fill=0)


def _to_pil(x: Tensor):
    from PIL import Image

    return Image.fromarray((x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)).contiguous().numpy())


def _from_pil(im) -> Tensor:
    import numpy as np

    a = torch.from_numpy(np.array(im))
    return a[None] if a.dim() == 2 else a.permute(2, 0, 1).contiguous()


def _get(d: dict, key: str, default: Any) -> Any:
    """``d[key]``, or ``default`` where it is missing or null (as transformers reads these files)."""
    return default if d.get(key) is None else d[key]


def _common_settings(d: dict, mean: tuple, std: tuple) -> dict:
    """The settings every image processor reads, with transformers' defaults."""
    return dict(resample=_get(d, "resample", 2), do_resize=_get(d, "do_resize", True),
                do_rescale=_get(d, "do_rescale", True), rescale_factor=_get(d, "rescale_factor", 1 / 255),
                do_normalize=_get(d, "do_normalize", True), image_mean=_get(d, "image_mean", mean),
                image_std=_get(d, "image_std", std), do_convert_rgb=_get(d, "do_convert_rgb", True))


def _config_file(f: Path) -> Path | None:
    """``f`` when it is a regular file, None when there is nothing there; a folder, a FIFO or a dangling link
    where the file should be is a ``CheckpointError``."""
    if f.is_file():
        return f
    if f.exists() or f.is_symlink():
        raise CheckpointError(f"{f}: not a regular file\n    fix: save the processor again, or delete it")
    return None


def _sizes(name: str, value: Any, allowed: tuple[set, ...], problems: list[Problem]) -> Any:
    """A size / crop_size: an int (a square) or a mapping with one of the ``allowed`` key sets."""
    if type(value) is int:
        value = {"height": value, "width": value}
    keys = " or ".join("{" + ", ".join(sorted(k)) + "}" for k in allowed)
    if not isinstance(value, dict) or set(value) not in allowed:
        problems.append(Problem(name, "not an image size", given=value, expected=f"an integer or a mapping {keys}",
                                fix=f"write {name}: {{height: 224, width: 224}}"))
        return value
    for key, side in value.items():
        if type(side) is not int or not 1 <= side <= MAX_SIDE:
            problems.append(Problem(f"{name}.{key}", "not an image side", given=side,
                                    expected=f"an integer from 1 to {MAX_SIDE:,} (pixels)",
                                    fix=f"use the encoder's image size, e.g. {name}.{key}: 224"))
    return dict(value)


def _per_channel(name: str, value: Any, channels: tuple[int, ...], problems: list[Problem], *, positive: bool) -> Any:
    """image_mean / image_std: a number for every channel, or one number for all; finite (std > 0)."""
    values = [value] if isinstance(value, (int, float)) else value
    ok = isinstance(values, (list, tuple)) and len(values) in (1, *channels) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
        for v in values)
    if ok:
        return tuple(float(v) for v in values)
    lengths = " or ".join(map(str, sorted({1, *channels})))
    problems.append(Problem(name, "not one number per channel", given=value,
                            expected=f"{lengths} finite number(s)" + (", each > 0" if positive else ""),
                            fix=f"write {name}: [0.5, 0.5, 0.5] (or the encoder's own values)"))
    return value


def _read_config(path: Path) -> Any:
    """``preprocessor_config.json`` as Python data; too large, not UTF-8 or not JSON: a ``CheckpointError``."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path.stat().st_size:,} bytes, more than {MAX_CONFIG_BYTES:,}")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a readable image processor config ({type(exc).__name__}: "
                              f"{str(exc)[:200]})\n    fix: save the processor again, or delete the file (the "
                              "encoder's own preprocessing is then used)") from None


def _name(image: Any) -> str:
    return short(str(image)) if isinstance(image, (str, Path)) else f"<{type(image).__name__}>"


def _to_uint8_tensor(image: Any, *, rgb: bool) -> Tensor:
    """(C, H, W) uint8 from a path, a PIL image or such a tensor: RGB when ``rgb``, else the image's base mode."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as tvF

    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3) or min(image.shape) < 1:
            raise InputError(f"an image tensor must be uint8 (C, H, W) with 1 or 3 channels; got {image.dtype} "
                             f"{tuple(image.shape)}\n    fix: pass torchvision.io.read_image(path) or a PIL image")
        return image
    if isinstance(image, (str, Path)):
        image = load_image(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL image, a path or a uint8 tensor; got {type(image).__name__}\n"
                         "    fix: pass image file paths or PIL images")
    if image.width < 1 or image.height < 1:
        raise InputError(f"an empty image ({image.width}x{image.height} pixels)\n    fix: leave it out")
    base = "RGB" if rgb or Image.getmodebase(image.mode) != "L" else "L"
    if base == "RGB" and ("A" in image.getbands() or image.info.get("transparency") is not None):
        # transparency is composited onto white, as transformers' convert_to_rgb does
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    if image.mode != base:
        image = image.convert(base)
    return tvF.pil_to_tensor(image)


def load_image(path: str | Path):
    """A decoded PIL image from a file, or an ``InputError`` naming it: refuses what is not a regular file (a
    FIFO, a folder, a device) before opening it, and images of more than ``MAX_IMAGE_PIXELS`` pixels."""
    from PIL import Image

    name = short(str(path))
    try:
        fd = _open_regular(path, name)
        with os.fdopen(fd, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bound below decides
            im = Image.open(fh)
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"its header declares {im.width}x{im.height} pixels")
            im.load()
            return im
    except Image.DecompressionBombError as exc:  # PIL's own (over twice its bound) or ours
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"its header declares {int(pixels[1]):,} pixels" if pixels else str(exc)
        raise InputError(f"{name}: too large an image ({declared}; at most {MAX_IMAGE_PIXELS:,} are read, as a "
                         "header this large can be a decompression bomb)\n    fix: downscale the image") from None
    except InputError:
        raise
    except Exception as exc:  # PIL raises many kinds for broken files (OSError, SyntaxError, struct.error, ...)
        why = "an empty file" if _size(path) == 0 else _why(exc)
        raise InputError(f"{name}: not a readable image ({why})\n    fix: give a PNG/JPEG/WebP file") from None


def _open_regular(path: str | Path, name: str) -> int:
    """A read-only descriptor of a regular file. The type is checked by ``stat`` first (nothing is opened), then
    again on the open descriptor (opened non-blocking, so a FIFO swapped in meanwhile cannot hang it)."""
    try:
        kind = _file_kind(os.stat(path).st_mode)
        if kind is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            kind = _file_kind(os.fstat(fd).st_mode)
            if kind is None:
                os.set_blocking(fd, True)
                return fd
            os.close(fd)
    except FileNotFoundError:
        raise InputError(f"{name}: no such image file\n    fix: check the path") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{name}: cannot be read ({_why(exc)})\n    fix: check the path and its permissions") from None
    raise InputError(f"{name}: {kind}, not an image file\n    fix: give the path of a PNG/JPEG/WebP file")


def _file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is."""
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
    return next((what for test, what in kinds.items() if test(mode)), "not a regular file")


def _why(exc: Exception) -> str:
    """An exception in a few words, without repeating the (possibly huge) file name."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not a format PIL reads"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _size(path: str | Path) -> int | None:
    try:
        return os.stat(path).st_size
    except (OSError, ValueError):
        return None


def processor_for(model) -> ImageProcessor | None:
    """The model's image processor: the one saved/loaded with it, else from its vision encoder's data config
    (``model.vision_tower()``, or its ``encoder``); None for a model without either."""
    proc = getattr(model, "image_processor", None)
    if proc is not None:
        return proc
    tower = model.vision_tower() if callable(getattr(model, "vision_tower", None)) else getattr(model, "encoder", None)
    preprocessing = getattr(tower, "preprocessing", None)
    return None if preprocessing is None else ImageProcessor.from_preprocessing(preprocessing)
