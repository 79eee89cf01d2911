"""The accelerator's peak dense-matmul throughput and copy bandwidth, measured, for roofline ideals in benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from analysis.benchmarks.trace_overhead import synchronize


@dataclass(frozen=True)
class DevicePeaks:
    """What the device sustained in this process: matmul FLOP/s (in ``dtype``) and copy bytes per second."""

    matmul_flops: float
    copy_bandwidth: float
    dtype: torch.dtype

    @property
    def bytes_per_value(self) -> int:
        """Bytes of one element of ``dtype``."""
        return torch.empty(0, dtype=self.dtype).element_size()

    def describe(self) -> str:
        """One line for a benchmark's header."""
        return (
            f"measured peaks: {self.matmul_flops / 1e12:.1f} TFLOP/s dense {str(self.dtype).removeprefix('torch.')} "
            f"matmul, {self.copy_bandwidth / 1e9:.0f} GB/s copy (read + write)"
        )


def _median_seconds(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The median of ``repeats`` timed calls of ``step`` after one untimed call."""
    step()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_peaks(device: torch.device, dtype: torch.dtype, *, size: int = 8192, copy_mib: int = 1024) -> DevicePeaks:
    """Time a ``size``-cubed matmul and a ``copy_mib`` MiB device-to-device copy (smaller on a CPU)."""
    if device.type == "cpu":
        size, copy_mib = min(size, 1024), min(copy_mib, 64)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    matmul = _median_seconds(lambda: torch.matmul(a, b, out=out), device, repeats=10)
    source = torch.empty(copy_mib * 2**20, device=device, dtype=torch.uint8)
    target = torch.empty_like(source)
    copy = _median_seconds(lambda: target.copy_(source), device, repeats=10)
    return DevicePeaks(2 * size**3 / matmul, 2 * source.numel() / copy, dtype)
