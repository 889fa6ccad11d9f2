"""A built-in labelled dataset: 10 classes of shapes and textures rendered on the fly with torch ops.

Geometry is drawn in image units (fractions of the side), so one (seed, index) gives the same scene at any
resolution; edges are anti-aliased over about one pixel by clamping a signed distance measured in pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from .rng import derive_seed, make_generator, uniform

SHAPE_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "ring", "cross", "star", "h_stripes", "v_stripes", "checker", "dots",
)

TensorView = Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]

_SPLIT_STREAMS = {"train": 0x7A11, "val": 0x5A1D}
_MIN_COLOUR_DIST = 0.45  # RGB distance in [0, 1]^3 between foreground and background


def _colours(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Background and foreground RGB in [0, 1], drawn independently, redrawn until far enough apart."""
    bg = torch.rand(3, generator=g)
    for _ in range(16):
        fg = torch.rand(3, generator=g)
        if float((fg - bg).norm()) >= _MIN_COLOUR_DIST:
            return bg, fg
    return bg, (bg < 0.5).float()  # at least 0.5 away on every channel


def _cover(sd_px: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels (negative inside) → coverage in [0, 1] with a ~1 px soft edge."""
    return (0.5 - sd_px).clamp_(0.0, 1.0)


def _soft_square(s: torch.Tensor, period: float, phase: float, size: int) -> torch.Tensor:
    """Anti-aliased 50% duty square wave along s (image units): sin scaled to ≈ pixel distance at crossings."""
    v = torch.sin(2 * math.pi * (s / period + phase))
    return (0.5 + v * (period * size / (2 * math.pi))).clamp_(0.0, 1.0)


def _rotate(x: torch.Tensor, y: torch.Tensor, angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def _box(x: torch.Tensor, y: torch.Tensor, hx: float, hy: float) -> torch.Tensor:
    """Exact signed distance to an axis-aligned box of half-extents (hx, hy) centred at the origin."""
    qx, qy = x.abs() - hx, y.abs() - hy
    outside = torch.hypot(qx.clamp(min=0), qy.clamp(min=0))
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _polygon(x: torch.Tensor, y: torch.Tensor, sides: int, radius: float, angle: float) -> torch.Tensor:
    """Regular polygon with circumradius `radius`: max of edge half-plane distances (exact inside)."""
    inradius = radius * math.cos(math.pi / sides)
    d = None
    for k in range(sides):
        a = angle + 2 * math.pi * k / sides
        e = x * math.cos(a) + y * math.sin(a)
        d = e if d is None else torch.maximum(d, e)
    return d - inradius


def render_shape(cls_idx: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """One image of class `cls_idx` (index into SHAPE_CLASSES) → (3, size, size) float in [-1, 1]."""
    if not 0 <= cls_idx < len(SHAPE_CLASSES):
        raise ValueError(f"class index {cls_idx} is not in 0..{len(SHAPE_CLASSES) - 1}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    u = uniform(generator, 8)
    bg, fg = _colours(generator)

    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in (0, 1)
    y, x = t[:, None].expand(size, size), t[None, :].expand(size, size)  # (H, W) each
    name = SHAPE_CLASSES[cls_idx]

    if name in ("circle", "square", "triangle", "ring", "cross", "star"):
        r = 0.2 + 0.15 * u[0]  # object radius, image units
        cx, cy = r + (1 - 2 * r) * u[1], r + (1 - 2 * r) * u[2]  # keeps the object (mostly) in frame
        px, py = x - cx, y - cy
        tilt = (u[3] - 0.5) * math.pi / 6  # ±15°: keeps square/cross upright-looking
        if name == "circle":
            sd = torch.hypot(px, py) - r
        elif name == "square":
            qx, qy = _rotate(px, py, tilt)
            sd = _box(qx, qy, 0.8 * r, 0.8 * r)
        elif name == "triangle":
            sd = _polygon(px, py, 3, r, 2 * math.pi * u[3])
        elif name == "ring":
            sd = (torch.hypot(px, py) - r).abs() - r * (0.15 + 0.12 * u[4])
        elif name == "cross":
            qx, qy = _rotate(px, py, tilt)
            arm = r * (0.22 + 0.1 * u[4])
            sd = torch.minimum(_box(qx, qy, r, arm), _box(qx, qy, arm, r))
        else:  # star: 5 tips, radius linear in angle between tip and notch
            phase = 2 * math.pi * u[3]
            frac = torch.remainder((torch.atan2(py, px) - phase) * (5 / (2 * math.pi)), 1.0)
            tip = (2 * frac - 1).abs()  # 1 at the tips, 0 in the notches
            sd = torch.hypot(px, py) - r * (0.45 + 0.55 * tip)
        cover = _cover(sd * size)
    else:
        period = max(0.08 + 0.17 * u[0], 4.0 / size)  # image units, never under 4 px
        tilt = (u[3] - 0.5) * math.pi / 9  # ±10°
        qx, qy = _rotate(x - 0.5, y - 0.5, tilt)
        if name == "h_stripes":
            cover = _soft_square(qy, period, u[1], size)
        elif name == "v_stripes":
            cover = _soft_square(qx, period, u[1], size)
        elif name == "checker":
            a, b = _soft_square(qx, period, u[1], size), _soft_square(qy, period, u[2], size)
            cover = a + b - 2 * a * b  # soft XOR
        else:  # dots on a square lattice
            period = max(period, 5.0 / size)
            fx = torch.remainder(qx / period + u[1], 1.0) - 0.5
            fy = torch.remainder(qy / period + u[2], 1.0) - 0.5
            sd = torch.hypot(fx, fy) * period - period * (0.22 + 0.12 * u[4])
            cover = _cover(sd * size)

    # gentle linear shading of the background so flat regions are not perfectly constant
    gx, gy = (u[5] - 0.5) * 0.25, (u[6] - 0.5) * 0.25
    shade = gx * (x - 0.5) + gy * (y - 0.5)  # (H, W)
    back = (bg[:, None, None] + shade).clamp_(0.0, 1.0)  # (3, H, W)
    img = torch.lerp(back, fg[:, None, None].expand_as(back), cover)  # (3, H, W) in [0, 1]
    return img.mul_(2.0).sub_(1.0)


class ShapesDataset(Dataset):
    """`length` procedural images; label = index % 10. Sample: `{**view(image, g), "label", "index"}` where
    `image` is (3, size, size) in [-1, 1] and depends only on (seed, split, index); `g` also on the epoch."""

    classes = SHAPE_CLASSES

    def __init__(
        self,
        size: int,
        length: int = 50_000,
        seed: int = 0,
        split: str = "train",
        view: TensorView | None = None,
    ) -> None:
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split must be one of {', '.join(_SPLIT_STREAMS)}, got {split!r}")
        if size < 1 or length < 1:
            raise ValueError(f"size and length must be >= 1, got size={size}, length={length}")
        self.size, self.length, self.seed, self.split = int(size), int(length), int(seed), split
        self.view = view
        self.epoch = 0
        self._stream = _SPLIT_STREAMS[split]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def label(self, i: int) -> int:
        return i % len(SHAPE_CLASSES)

    def render(self, i: int) -> torch.Tensor:
        """The (3, size, size) image at index i, independent of the epoch."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, self._stream, i))
        return render_shape(self.label(i), self.size, g)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} images")
        i %= self.length
        image = self.render(i)
        if self.view is None:
            views = {"image": image}
        else:
            views = self.view(image, make_generator(self.seed, self._stream, self.epoch, i, 1))
        return {**views, "label": self.label(i), "index": i}
