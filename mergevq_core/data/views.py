"""The tokenizer's input views, on PIL images or (3, H, W) tensors, with every random draw from a generator.

Tensors may be uint8 in [0, 255] or float in [-1, 1] (the shapes data); PIL images are converted to uint8
tensors first, so all geometry runs through torchvision's tensor kernels (antialiased resizes).
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .images import pil_to_uint8
from .rng import randint, uniform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Image.Image | torch.Tensor


def as_tensor(img: ImageLike) -> torch.Tensor:
    """PIL → (3, H, W) uint8; tensors are checked and passed through (uint8, or float in [-1, 1])."""
    if isinstance(img, Image.Image):
        return pil_to_uint8(img)
    if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] != 3:
        shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise TypeError(f"expected a PIL image or a (3, H, W) tensor, got {shape}")
    return img


def _to_signed(x: torch.Tensor) -> torch.Tensor:
    """uint8 or [-1, 1] float → float32 in [-1, 1]."""
    if x.dtype == torch.uint8:
        return x.float().div_(127.5).sub_(1.0)
    return x.float().clamp(-1.0, 1.0)


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 or [-1, 1] float → float32 in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float().add(1.0).mul_(0.5).clamp_(0.0, 1.0)


def _resize_short(x: torch.Tensor, size: int, mode: InterpolationMode) -> torch.Tensor:
    """Resize so the shorter side is `size` (aspect kept, the longer side at least `size`)."""
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    if h <= w:
        new = (size, max(size, round(w * size / h)))
    else:
        new = (max(size, round(h * size / w)), size)
    return TF.resize(x, list(new), interpolation=mode, antialias=True)


def _random_crop(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = randint(g, 0, h - size + 1), randint(g, 0, w - size + 1)
    return x[..., top : top + size, left : left + size]


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def recon_view(img: ImageLike, size: int, generator: torch.Generator, train: bool = True) -> torch.Tensor:
    """Tokenizer input → (3, size, size) in [-1, 1].

    train: shorter side → size (bicubic, antialiased), random size×size crop;
    eval: shorter side → size (bilinear), centre crop (draws nothing from the generator).
    """
    x = as_tensor(img)
    if train:
        x = _random_crop(_resize_short(x, size, InterpolationMode.BICUBIC), size, generator)
    else:
        x = _center_crop(_resize_short(x, size, InterpolationMode.BILINEAR), size)
    return _to_signed(x).contiguous()


def teacher_view(img: ImageLike, size: int = 224, generator: torch.Generator | None = None) -> torch.Tensor:
    """DINOv2 teacher input → (3, size, size), ImageNet mean/std normalised.
    Shorter side → size (bicubic), random crop (centre crop without a generator)."""
    x = _resize_short(as_tensor(img), size, InterpolationMode.BICUBIC)
    x = _random_crop(x, size, generator) if generator is not None else _center_crop(x, size)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((_to_unit(x) - mean) / std).contiguous()


def _resized_crop_params(
    h: int, w: int, g: torch.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop, as in torchvision but drawn from `g`."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u_area, u_ratio = uniform(g, 2)
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return randint(g, 0, h - ch + 1), randint(g, 0, w - cw + 1), ch, cw
    # fallback: the largest centred crop with a ratio inside the range
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    ch, cw = max(1, min(ch, h)), max(1, min(cw, w))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def student_view(
    img: ImageLike,
    size: int = 224,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Random-resized crop (bicubic) + horizontal flip with p = 0.5 → (3, size, size) in [-1, 1]."""
    if generator is None:
        raise TypeError("student_view needs a torch.Generator: every view is random")
    g = generator
    x = as_tensor(img)
    top, left, ch, cw = _resized_crop_params(x.shape[-2], x.shape[-1], g, scale, ratio)
    x = TF.resized_crop(x, top, left, ch, cw, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if uniform(g, 1)[0] < 0.5:
        x = TF.horizontal_flip(x)
    return _to_signed(x).contiguous()


class TokenizerViews:
    """`(img, generator) -> {"image": (3,S,S) in [-1,1]}` plus, with `align`, `"teacher"` (3,T,T) ImageNet-
    normalised and `"student"` (3,U,U) in [-1,1]. Draw order: image, teacher, student.
    Eval (`train=False`): image and teacher are centre crops; the student view stays random."""

    def __init__(
        self, size: int, teacher_size: int = 224, student_size: int = 224, train: bool = True, align: bool = False
    ) -> None:
        if min(size, teacher_size, student_size) < 1:
            raise ValueError("view sizes must be >= 1")
        self.size, self.teacher_size, self.student_size = int(size), int(teacher_size), int(student_size)
        self.train, self.align = bool(train), bool(align)

    def __call__(self, img: ImageLike, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = as_tensor(img)  # convert a PIL image once for all views
        out = {"image": recon_view(x, self.size, generator, train=self.train)}
        if self.align:
            out["teacher"] = teacher_view(x, self.teacher_size, generator if self.train else None)
            out["student"] = student_view(x, self.student_size, generator)
        return out

    def __repr__(self) -> str:
        return (
            f"TokenizerViews(size={self.size}, teacher_size={self.teacher_size}, "
            f"student_size={self.student_size}, train={self.train}, align={self.align})"
        )


VIEW_COUNTS = {"center": 1, "flip": 2, "ten-crop": 10}


class TokenizeViews:
    """The views `mergevq tokenize` stores per image → `{"views": (V, 3, S, S)}` in the input's dtype (uint8 for
    files, so DataLoader workers hand over 4× fewer bytes; `signed` turns them into [-1, 1]).

    The shorter side is resized (bilinear, antialiased) to round(size · crop_range) and the centred square of
    that side is kept; then `center` takes its centre size×size crop (with crop_range 1 exactly the evaluation
    view `reconstruct` uses), `flip` adds that crop mirrored, `ten-crop` (LlamaGen's extraction) takes the
    centre and the four corner crops and their mirror images. View 0 is always the centre crop. Deterministic:
    the generator is not drawn from."""

    def __init__(self, size: int, mode: str = "ten-crop", crop_range: float = 1.1) -> None:
        if mode not in VIEW_COUNTS:
            raise ValueError(f"views must be one of {', '.join(VIEW_COUNTS)}, got {mode!r}")
        if not 1.0 <= crop_range <= 2.0:
            raise ValueError(f"crop_range must be in [1, 2], got {crop_range}")
        self.size, self.mode, self.crop_range = int(size), mode, float(crop_range)
        self.side = max(self.size, round(self.size * self.crop_range))

    @property
    def count(self) -> int:
        return VIEW_COUNTS[self.mode]

    def describe(self) -> dict[str, object]:
        return {"mode": self.mode, "count": self.count, "crop_range": self.crop_range}

    def __call__(self, img: ImageLike, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        x = _center_crop(_resize_short(as_tensor(img), self.side, InterpolationMode.BILINEAR), self.side)
        s, d = self.size, self.side - self.size
        crops = [_center_crop(x, s)]
        if self.mode == "ten-crop":
            crops += [x[..., :s, :s], x[..., :s, d:], x[..., d:, :s], x[..., d:, d:]]
        if self.mode != "center":
            crops += [TF.horizontal_flip(c) for c in crops]
        return {"views": torch.stack([c.contiguous() for c in crops])}

    @staticmethod
    def signed(views: torch.Tensor) -> torch.Tensor:
        """uint8 or [-1, 1] float views → float32 in [-1, 1]."""
        return _to_signed(views)

    def __repr__(self) -> str:
        return f"TokenizeViews(size={self.size}, mode={self.mode!r}, crop_range={self.crop_range})"
