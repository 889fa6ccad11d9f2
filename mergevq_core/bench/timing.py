"""Timing helpers: synchronised wall-clock timing on CUDA, quantiles, device facts."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable

import torch

# peak memory bandwidth (bytes/s) of devices we know, matched on the CUDA device name
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.04e12, "L40S": 0.864e12, "A10": 0.6e12, "4090": 1.008e12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of fn takes, synchronised before and after on CUDA."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def quantiles(values: list[float]) -> dict[str, float]:
    v = sorted(values)

    def q(p: float) -> float:
        if len(v) == 1:
            return v[0]
        x = p * (len(v) - 1)
        lo = int(x)
        return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (x - lo)

    return {"median": statistics.median(v), "p10": q(0.1), "p90": q(0.9), "mean": statistics.fmean(v)}


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def environment(device: torch.device) -> dict[str, Any]:
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env.update({"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                    "peak_bandwidth_bytes_per_s": peak_bandwidth(device)})
    return env
