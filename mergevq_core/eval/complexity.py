"""Parameter and multiply-accumulate counts without real data.

Convention (paper Table A1, fvcore, SPEC §1): MACs of convolutions and linear layers only; attention's QKᵀ and
AV products, norms and activations are not counted. Forward hooks read output shapes, so the model runs on the
meta device: no memory, no arithmetic, any size.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import Tensor, nn


def count_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _layer_macs(module: nn.Module, out: Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


@contextmanager
def mac_counter(root: nn.Module) -> Iterator[Callable[[], int]]:
    """Counts conv/linear MACs of every forward call under `root` while the context is open."""
    total = [0]
    handles = [
        m.register_forward_hook(lambda mod, _inp, out: total.__setitem__(0, total[0] + _layer_macs(mod, out)))
        for m in root.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        yield lambda: total[0]
    finally:
        for h in handles:
            h.remove()
