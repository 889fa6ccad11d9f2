"""DINOv2 → MergeVQ encoder initialisation by weight selection (Xu et al. 2023; paper A.1).

Every teacher tensor under `blocks.*` and `cls_token` is shrunk to the student's shape dimension by dimension,
taking evenly spaced elements (every step-th when the sizes divide, else rounded linspace). The student takes
the teacher's first `depth` blocks. Unlike the release, q/k/v rows of `attn.qkv` are selected inside each of
the three projections, so their boundaries are kept exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError


def read_state_dict(path: str | Path, option: str) -> dict[str, Tensor]:
    """A flat tensor dict from .safetensors or a torch file (loaded with weights_only=True, never executing code)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"weights file not found: {p} (set {option})")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: say which, not where it broke
        raise CheckpointError(f"cannot read weights {p}: {type(e).__name__}: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{p} is not a flat state dict of tensors (expected timm layout, set {option})")
    return sd


def _select_indices(t: int, s: int) -> Tensor:
    if s > t:
        raise ValueError(f"cannot select {s} elements from {t}")
    if t % s == 0:
        return torch.arange(0, t, t // s)
    return torch.linspace(0, t - 1, s).round().long()


def select_weights(teacher: Tensor, shape: torch.Size | tuple[int, ...], qkv: bool = False) -> Tensor:
    """Uniform element selection of `teacher` down to `shape` (same number of dims)."""
    if teacher.dim() != len(shape):
        raise ValueError(f"rank mismatch: teacher {tuple(teacher.shape)} vs student {tuple(shape)}")
    out = teacher
    for d, s in enumerate(shape):
        t = out.shape[d]
        if qkv and d == 0:  # rows are [q; k; v]: select within each third
            idx = torch.cat([i * (t // 3) + _select_indices(t // 3, s // 3) for i in range(3)])
        else:
            idx = _select_indices(t, s)
        out = out.index_select(d, idx)
    return out


def init_from_dinov2(encoder: nn.Module, path: str | Path, option: str = "model.encoder.dinov2_weights") -> list[str]:
    """Copy weight-selected DINOv2 block and cls weights into `encoder` in place; returns the student keys set.
    Raises ConfigError for a missing file and CheckpointError when the teacher lacks a needed tensor."""
    teacher = read_state_dict(path, option)
    student = encoder.state_dict()
    wanted = [k for k in student if k.startswith("blocks.") or k == "cls_token"]
    missing = [k for k in wanted if k not in teacher]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensors the encoder needs, e.g. {missing[:3]}")
    new = {}
    for k in wanted:
        try:
            new[k] = select_weights(teacher[k].float(), student[k].shape, qkv=k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias"))
        except ValueError as e:
            raise CheckpointError(f"{path}: {k}: {e}") from None
    encoder.load_state_dict(new, strict=False)
    return wanted
