"""What the training loop measures and records: the peak FLOP/s its MFU is measured against (a table of
GPU peaks, a timed matmul elsewhere) and ``metrics.jsonl``, the row per step and evaluation every stage
writes, which resumes cut back to their checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..store.files import append_text, atomic_write_text, read_appended

# ---------------------------------------------------------------- peak FLOP/s for MFU
# dense bf16 tensor-core peaks (no sparsity), by device-name substring
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
                 "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def measure_matmul_peak(device: torch.device, dtype=torch.float32, n: int = 1024, seconds: float = 0.3,
                        rounds: int = 8) -> float:
    """FLOP/s of a large square matmul on this device in this process (threads as configured): the best of
    at least ``rounds`` timed rounds and ``seconds`` of them, so one slow moment cannot set the peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, end, done = 0.0, time.perf_counter() + seconds, 0
    while done < rounds or time.perf_counter() < end:
        done += 1
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best


def peak_flops(device: torch.device, dtype: str) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if dtype != "float32":
            for key, val in GPU_PEAK_BF16.items():
                if key in name:
                    return val
        return measure_matmul_peak(device, torch.bfloat16 if dtype != "float32" else torch.float32, n=4096)
    return measure_matmul_peak(device)


# ---------------------------------------------------------------- metrics
class Metrics:
    """``metrics.jsonl``: one JSON object per line. On resume, lines past the checkpoint are dropped
    (they belong to work the checkpoint does not hold), along with any torn last line."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        if not (self.enabled and self.path.exists()):
            return
        keep = [line for line, row in read_appended(self.path) if row.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, row: dict) -> None:
        if self.enabled:
            append_text(self.path, json.dumps(row) + "\n")  # a full disk: DiskFullError naming the file


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl (a torn last line of a run killed while it logged left out)."""
    return [row for _, row in read_appended(path)]
