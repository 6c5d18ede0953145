"""What users see: one JSON object per step in metrics.jsonl, TensorBoard scalars, log lines,
and the throughput arithmetic behind tokens/s and MFU."""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import time

import torch

from megads.config import ModelConfig
from megads.model.deepseek_v3 import count_parameters
from megads.train.run_dir import parse_record

log = logging.getLogger("megads")

_KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}   # dense bf16


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x activated matrix parameters (the embedding lookup excluded)
    plus causal attention, 3 x seq_len * heads * (qk + v) per layer (MTP depths included)."""
    counts = count_parameters(cfg)
    params = counts["active_with_mtp"] - counts["embedding"]
    layers = cfg.num_layers + cfg.mtp_depth
    attention = 3 * seq_len * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * layers
    return 6.0 * params + attention


def peak_flops(device: torch.device, configured_tflops: float | None) -> float:
    """The device's peak FLOP/s for MFU: the configured value, a known GPU's bf16 peak, or on CPU a
    short fp32 matmul measurement."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    a = torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(6):                      # the best of a few fp32 matmuls
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * 1024 ** 3 / best


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class MetricsWriter:
    """Writes metrics.jsonl and TensorBoard scalars under run_dir (only where `enabled`, i.e. one rank)."""

    def __init__(self, run_dir: str, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._truncate_after(resume_step)
        from torch.utils.tensorboard import SummaryWriter
        self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        """Drop lines of steps after the checkpoint we resume from (written by a run that died), and a
        torn last line (a crash or a full disk mid-write); rewrite the file atomically."""
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            lines = [line for line in f.read().split(b"\n") if line.strip()]
        records = [parse_record(line) for line in lines]
        if records and records[-1] is None:
            log.warning(f"{self.path}: dropping a torn last line ({len(lines[-1])} bytes, not a JSON record)")
            lines, records = lines[:-1], records[:-1]
        if any(record is None for record in records):
            raise ValueError(f"{self.path} holds a damaged line before its last; repair or delete it")
        kept = b"".join(line + b"\n" for line, record in zip(lines, records) if record.get("step", 0) <= step)
        with open(self.path + ".tmp", "wb") as f:
            f.write(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.path + ".tmp", self.path)

    def write(self, record: dict, prefix: str = "train", histograms: dict | None = None) -> None:
        """Append `record` to metrics.jsonl; its numbers (and any `histograms`) go to TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
        for key, values in (histograms or {}).items():
            self._tb.add_histogram(f"{prefix}/{key}", values, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
