"""Numeric precision, chosen in one place: `--precision fp32|bf16` for tokenizer inference (reconstruct, tokenize,
benchmark tokenizer) and `train.precision` for the training loop.

bf16 is `torch.autocast(device_type, dtype=torch.bfloat16)` on CUDA and on CPU alike. It is fast on GPUs and on
CPUs with native bf16 (AVX-512 BF16, AMX); elsewhere oneDNN emulates it and convolutions run tens of times
slower than fp32, so `slow_bf16_warning` gives the line the commands print before such a run.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

__all__ = ["PRECISIONS", "TRAIN_PRECISIONS", "autocast", "check_precision", "native_bf16", "slow_bf16_warning",
           "train_autocast"]

PRECISIONS = ("fp32", "bf16")  # inference
TRAIN_PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # train.precision; auto: bf16 on CUDA, fp32 elsewhere


def check_precision(value: str | None, option: str = "--precision") -> str:
    """`fp32` or `bf16` (None: fp32); anything else is a ConfigError naming `option`."""
    if value is None:
        return "fp32"
    v = str(value).strip().lower()
    if v not in PRECISIONS:
        raise ConfigError(f"{option} {value!r}: choose fp32 or bf16")
    return v


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context encode / decode run in: bf16 autocast on the device's type, or nothing for fp32."""
    p = check_precision(precision)
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=p == "bf16")


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU that supports it, a CPU with AVX-512 BF16 / AMX."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True  # other backends: no known penalty to warn about


def slow_bf16_warning(precision: str, device: torch.device | str) -> str | None:
    """The one warning line for bf16 on a device without native bf16, else None."""
    if check_precision(precision) != "bf16" or native_bf16(device):
        return None
    cap = torch.backends.cpu.get_cpu_capability() if torch.device(device).type == "cpu" else str(device)
    return (f"--precision bf16 on this CPU ({cap}, no native bf16) is emulated, tens of times slower than fp32; "
            "it runs, but bf16 is meant for GPUs and CPUs with AVX-512 BF16 / AMX")


def train_autocast(precision: str, device: torch.device | str) -> torch.autocast:
    """The training loop's autocast for `train.precision`: bf16 on any device, fp16 on CUDA only (a ConfigError
    elsewhere), `auto` bf16 on CUDA and fp32 elsewhere, fp32 none."""
    dev = torch.device(device)
    if precision not in TRAIN_PRECISIONS:
        raise ConfigError(f"train.precision {precision!r}: choose one of {', '.join(TRAIN_PRECISIONS)}")
    if precision == "fp16" and dev.type != "cuda":
        raise ConfigError(f"train.precision=fp16 needs a CUDA device (this run is on {dev}): use bf16 or fp32")
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(dev.type, dtype=dtype, enabled=precision != "fp32")
