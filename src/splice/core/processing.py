"""Images in, pixel_values out: the encoder's preprocessing, compatible with transformers' preprocessor_config.json.

The steps follow transformers' torchvision image processors (resize a uint8 tensor with antialiasing, centre
crop, then one fused rescale+normalise), so the same image gives the same pixel values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from splice.core.errors import InputError
from splice.core.interfaces import Preprocessing

# PIL's resampling codes (what preprocessor_config.json stores) -> torchvision's modes
_PIL_TO_MODE = {0: "NEAREST_EXACT", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
_NAME_TO_PIL = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
FILE = "preprocessor_config.json"


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

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_preprocessing(cls, p: Preprocessing) -> "ImageProcessor":
        """From an encoder's data config (timm style: resize the short side to size / crop_pct, then crop)."""
        h, w = p.image_size
        resample = _NAME_TO_PIL.get(p.interpolation, 3)
        common = dict(resample=resample, image_mean=tuple(p.mean), image_std=tuple(p.std), do_convert_rgb=p.in_chans == 3)
        if p.crop_pct >= 1.0 or h != w:
            return cls(size={"height": h, "width": w}, **common)
        return cls(size={"shortest_edge": int(h / p.crop_pct)}, do_center_crop=True,
                   crop_size={"height": h, "width": w}, **common)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessor":
        """From a transformers ``preprocessor_config.json`` (ViT, DeiT, BEiT, Swin image processors)."""
        size = d.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        crop = d.get("crop_size")
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        resample = d.get("resample", 2)
        return cls(
            size=dict(size),
            resample=int(resample),
            do_resize=d.get("do_resize", True),
            do_center_crop=d.get("do_center_crop", False) and crop is not None,
            crop_size=crop,
            do_rescale=d.get("do_rescale", True),
            rescale_factor=d.get("rescale_factor", 1 / 255),
            do_normalize=d.get("do_normalize", True),
            image_mean=tuple(d.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(d.get("image_std", (0.5, 0.5, 0.5))),
            do_convert_rgb=d.get("do_convert_rgb", True) is not False,
        )

    @classmethod
    def from_folder(cls, folder: Path) -> "ImageProcessor | None":
        f = Path(folder) / FILE
        return cls.from_dict(json.loads(f.read_text())) if f.is_file() else None

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
        return torch.stack([self.one(im) for im in images])

    def one(self, image: Any) -> Tensor:
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as tvF

        x = _to_uint8_tensor(image, rgb=self.do_convert_rgb)  # (C, H, W) uint8
        if self.do_resize:
            mode = getattr(v2.InterpolationMode, _PIL_TO_MODE[self.resample])
            x = tvF.resize(x, self._resized_hw(x), interpolation=mode, antialias=True)
        if self.do_center_crop and self.crop_size:
            ch, cw = self.crop_size["height"], self.crop_size["width"]
            x = tvF.center_crop(x, [ch, cw])
        x = x.to(torch.float32)
        if self.do_rescale and self.do_normalize:  # one fused step, as transformers does
            mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
            return tvF.normalize(x, mean.tolist(), std.tolist())
        if self.do_normalize:
            return tvF.normalize(x, list(self.image_mean), list(self.image_std))
        if self.do_rescale:
            return x * self.rescale_factor
        return x

    def _resized_hw(self, x: Tensor) -> list[int]:
        if "height" in self.size and "width" in self.size:
            return [self.size["height"], self.size["width"]]
        short = self.size["shortest_edge"]
        h, w = x.shape[-2:]
        if h <= w:
            return [short, int(short * w / h)]
        return [int(short * h / w), short]


def _to_uint8_tensor(image: Any, *, rgb: bool) -> Tensor:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as tvF

    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3:
            raise InputError(f"an image tensor must be uint8 (C, H, W); got {image.dtype} {tuple(image.shape)}")
        return image
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except FileNotFoundError:
            raise InputError(f"{path}: no such image file") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{path}: not a readable image ({exc})\n    fix: give a PNG/JPEG/WebP file") from None
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL image, a path or a uint8 tensor; got {type(image).__name__}")
    if rgb and image.mode != "RGB":
        image = image.convert("RGB")
    return tvF.pil_to_tensor(image)


def processor_for(model) -> ImageProcessor:
    """The model's image processor: the one saved/loaded with it, else from its encoder's data config."""
    proc = getattr(model, "image_processor", None)
    return proc if proc is not None else ImageProcessor.from_preprocessing(model.encoder.preprocessing)
