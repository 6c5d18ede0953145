"""The pretraining loop: micro-batch accumulation, clipping, AdamW, router-bias balancing,
non-finite step skipping, validation, metrics and checkpoints. No maths of its own lives here."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from megads.checkpoint.local import latest_checkpoint, load_checkpoint, save_checkpoint
from megads.config import Config, lr_at, schedule_value
from megads.data import BatchLoader, PackedSequences, PreparedData
from megads.model.deepseek_v3 import DeepSeekV3
from megads.model.moe import balance_loss_scale
from megads.train.metrics import MetricsWriter, flops_per_token, format_duration, memory_gib, peak_flops
from megads.train.optim import build_optimizer, set_lr

log = logging.getLogger("megads")


class NonFiniteError(RuntimeError):
    """Training produced too many consecutive non-finite steps."""


@dataclass
class StepResult:
    loss: float
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    grad_norm: float
    max_load_ratio: float       # max over MoE layers of max expert load / mean load
    skipped: bool
    bad_tensor: str | None = None


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cpu")


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.train.dtype]


class Trainer:
    def __init__(self, cfg: Config, data: PreparedData, device: torch.device | None = None):
        self.cfg = cfg
        self.device = device or resolve_device(cfg)
        self.dtype = resolve_dtype(cfg, self.device)
        t = cfg.train
        torch.manual_seed(t.seed)
        self.model = DeepSeekV3(cfg.model).to(self.device)
        self.model.init_weights()
        for moe in self.model.moe_layers():
            moe.balance_alpha = t.seq_aux_alpha
        self.optimizer = build_optimizer(self.model, t, self.device)
        eos = data.tokenizer.eos_id
        self.train_batches = BatchLoader(PackedSequences(data.train, t.seq_len, t.seed, eos), t.global_batch, t.micro_batch)
        self.valid_sequences = PackedSequences(data.valid, t.seq_len, t.seed, eos)
        self.step = 0
        self.nonfinite_streak = 0
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.peak_flops = peak_flops(self.device, t.peak_tflops)

    # ------------------------------------------------------------------ one optimizer step

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def train_step(self, micro_batches: list[torch.Tensor]) -> StepResult:
        t, model = self.cfg.train, self.model
        model.train()
        set_lr(self.optimizer, lr_at(t, self.step))
        mtp_weight = schedule_value(t.mtp_loss_weight, self.step)
        n = len(micro_batches)
        totals = torch.zeros(4, dtype=torch.float64)
        with balance_loss_scale(1.0 / n):
            for batch in micro_batches:
                batch = batch.to(self.device, non_blocking=True)
                with self.autocast():
                    out = model(batch[:, :-1], batch[:, 1:], mtp_weight)
                balance = sum((m.last_balance_loss for m in model.moe_layers()), torch.zeros((), device=self.device))
                (out.loss / n).backward()
                totals += torch.stack([out.loss.detach() + balance, out.lm_loss.detach(), out.mtp_loss.detach(),
                                       balance]).double().cpu() / n
        loss, lm_loss, mtp_loss, balance_loss = totals.tolist()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm(grads)
        grad_norm = float(total_norm)
        load_ratio = self.load_ratio()
        bad = None
        if not math.isfinite(loss):
            bad = "loss"
        elif not math.isfinite(grad_norm):
            bad = self.first_nonfinite_gradient()
        elif t.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), t.grad_clip, total_norm)
        if bad is None:
            self.optimizer.step()
            self.update_router_biases()
        else:
            for moe in model.moe_layers():
                moe.expert_load.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, lm_loss, mtp_loss, balance_loss, grad_norm, load_ratio, bad is not None, bad)

    def first_nonfinite_gradient(self) -> str:
        for name, p in self.model.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"{name}.grad"
        return "grad_norm"

    def update_router_biases(self) -> None:
        gamma = schedule_value(self.cfg.train.bias_update_speed, self.step)
        for moe in self.model.moe_layers():
            moe.update_bias(moe.expert_load, gamma, self.cfg.train.bias_recenter)
            moe.expert_load.zero_()

    def load_ratio(self) -> float:
        """max over MoE layers of (max expert load / mean load) over this step's forwards so far."""
        ratios = [(m.expert_load.max() / m.expert_load.mean()).item() for m in self.model.moe_layers()
                  if m.expert_load.sum() > 0]
        return max(ratios) if ratios else 1.0

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over the first eval_batches micro-batches of the held-out stream."""
        t = self.cfg.train
        self.model.eval()
        losses = []
        for i in range(t.eval_batches):
            batch = torch.stack([self.valid_sequences[i * t.micro_batch + j] for j in range(t.micro_batch)])
            batch = batch.to(self.device)
            with self.autocast():
                losses.append(self.model(batch[:, :-1], batch[:, 1:]).lm_loss.float().item())
        return sum(losses) / len(losses)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "nonfinite_streak": self.nonfinite_streak,
                "data": self.train_batches.state_dict(), "rng": torch.get_rng_state(),
                "config": self.cfg.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.nonfinite_streak = state["nonfinite_streak"]
        self.train_batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])

    def save(self) -> str:
        c = self.cfg.checkpoint
        return save_checkpoint(self.cfg.checkpoint_dir, self.step, self.state_dict(), c.keep_last)

    def maybe_resume(self) -> str | None:
        c = self.cfg.checkpoint
        path = None if c.resume == "none" else latest_checkpoint(self.cfg.checkpoint_dir) if c.resume == "auto" else c.resume
        if path is not None:
            self.load_state_dict(load_checkpoint(path))
        return path

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        resumed = self.maybe_resume()
        if resumed:
            log.info(f"resumed from {resumed} at step {self.step}")
        metrics = MetricsWriter(cfg.run_dir, enabled=True, resume_step=self.step)
        tokens_per_step = t.global_batch * t.seq_len
        started, start_step = time.perf_counter(), self.step
        if self.step == 0 and t.eval_interval:
            metrics.write({"step": 0, "valid_loss": self.evaluate()})
        while self.step < t.steps:
            tic = time.perf_counter()
            result = self.train_step(self.train_batches.next_step())
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - tic
            self.step += 1
            record = {"step": self.step, "loss": result.loss, "lm_loss": result.lm_loss, "mtp_loss": result.mtp_loss,
                      "balance_loss": result.balance_loss, "lr": lr_at(t, self.step - 1), "grad_norm": result.grad_norm,
                      "tokens_per_s": tokens_per_step / elapsed,
                      "mfu": tokens_per_step * self.flops_per_token / elapsed / self.peak_flops,
                      "max_load_ratio": result.max_load_ratio, "memory_gib": memory_gib(self.device), "skipped": result.skipped}
            if result.skipped:
                self.nonfinite_streak += 1
                log.warning(f"step {self.step}: non-finite {result.bad_tensor} (loss {result.loss}, grad norm "
                            f"{result.grad_norm}); update skipped ({self.nonfinite_streak} in a row)")
                if self.nonfinite_streak >= t.max_nonfinite_steps:
                    metrics.write(record)
                    metrics.close()
                    raise NonFiniteError(f"stopping at step {self.step}: {self.nonfinite_streak} consecutive non-finite "
                                         f"steps; the first non-finite tensor of this step is {result.bad_tensor}")
            else:
                self.nonfinite_streak = 0
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps):
                record["valid_loss"] = self.evaluate()
            metrics.write(record)
            if self.step % t.log_interval == 0 or self.step == t.steps:
                rate = (time.perf_counter() - started) / (self.step - start_step)
                valid = f" | valid {record['valid_loss']:.4f}" if "valid_loss" in record else ""
                log.info(f"step {self.step}/{t.steps} | loss {result.loss:.4f}{valid} | lr {record['lr']:.2e} | "
                         f"grad {result.grad_norm:.3f} | {record['tokens_per_s'] / 1e3:.1f}k tok/s | "
                         f"mfu {100 * record['mfu']:.1f}% | mem {record['memory_gib']:.2f} GiB | "
                         f"eta {format_duration(rate * (t.steps - self.step))}")
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                self.save()
        if cfg.checkpoint.save_at_end and self.step > start_step:
            self.save()
        metrics.close()
        return {"steps": self.step, "run_dir": cfg.run_dir, "metrics": metrics.path}
