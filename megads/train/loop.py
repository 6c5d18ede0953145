"""The loop every training stage shares — pretraining, SFT, GRPO: resume, steps, metrics.jsonl
and TensorBoard, evaluation, log lines with ETA, checkpoints, non-finite steps, preemption and
the save at the end. A stage subclasses `TrainingLoop` and supplies one step (`run_step`), its
evaluation (`eval_record`), its log fields and its trainer state; the rules live here once:

- a step whose update was skipped as non-finite counts towards `train.max_nonfinite_steps`; no
  checkpoint is written after such a step, so a streak cannot rotate the healthy checkpoints
  out of `checkpoint.keep_last`; an update that leaves a weight non-finite stops at once;
- a preemption signal stops every rank after the same step, with a checkpoint to resume from.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch.distributed as dist

from megads.checkpoint import check_checkpoint_space, latest_checkpoint, load_checkpoint, save_checkpoint
from megads.config import Config, lr_at
from megads.parallel.mesh import Mesh
from megads.train.metrics import MetricsWriter, format_duration
from megads.train.preemption import PreemptionSignals

log = logging.getLogger("megads")


class NonFiniteError(RuntimeError):
    """Training became non-finite: too many skipped steps in a row, or non-finite weights."""


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cpu")


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.train.dtype]


class TrainingLoop:
    """Base of the stages. Subclasses build `model` (with its parallel `plan`), `optimizer` and
    `stepper` in their __init__
    after calling this one, and implement the hooks below."""

    log_prefix = ""                      # before "step N/M" in log lines, e.g. "sft "
    evaluates_at_start_and_end = True    # evaluate at step 0 and the last step even when eval_interval is 0

    def __init__(self, cfg: Config, mesh: Mesh | None = None, device: torch.device | None = None):
        self.cfg = cfg
        self.mesh = mesh or Mesh()
        self.device = device or resolve_device(cfg)
        self.dtype = resolve_dtype(cfg, self.device)
        self.step = 0                    # optimizer steps taken
        self.nonfinite_streak = 0        # consecutive steps skipped as non-finite

    # ------------------------------------------------------------------ hooks of a stage

    @property
    def eval_interval(self) -> int:
        raise NotImplementedError

    def run_step(self) -> tuple[dict, dict]:
        """One step: (its metrics record without "step": must hold "skipped", and the name of the
        first non-finite tensor as "nonfinite_tensor" when it is true; TensorBoard histograms)."""
        raise NotImplementedError

    def step_timing(self, seconds: float) -> dict:
        """Timing fields of a step's record."""
        return {"step_time_s": seconds}

    def eval_record(self) -> dict:
        raise NotImplementedError

    def log_fields(self, record: dict) -> str:
        raise NotImplementedError

    def reached_target(self, record: dict) -> bool:
        """Whether to end the run after the step that produced `record`."""
        return False

    def state_dict(self) -> dict:
        """Trainer state besides the model and optimizer tensors (those are saved per global tensor)."""
        state = {"step": self.step, "nonfinite_streak": self.nonfinite_streak, "rng": torch.get_rng_state(),
                 "config": self.cfg.to_dict()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def checkpoint_metadata(self) -> dict:
        return {"model_config": dataclasses.asdict(self.cfg.model)}

    # ------------------------------------------------------------------ shared pieces

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def check_weights_finite(self) -> None:
        """Raise NonFiniteError when an applied update left a non-finite weight (finite gradients
        times an enormous learning rate): no later step or checkpoint may start from such weights."""
        params = [(name, p.detach()) for name, p in self.model.named_parameters() if p.requires_grad]
        largest = torch._foreach_norm([p for _, p in params], float("inf"))     # max |w| per tensor, no copies
        finite = torch.stack([m.float() for m in largest]).isfinite()           # [n_params]
        bad = (~finite).any().to(torch.int32).reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            first = next((name for (name, _), ok in zip(params, finite.tolist()) if not ok), "a weight of another rank")
            raise NonFiniteError(f"the update of step {self.step + 1} made {first} non-finite (train.lr "
                                 f"{lr_at(self.cfg.train, self.step):.3g}); {self.good_checkpoint_advice()}")

    def good_checkpoint_advice(self) -> str:
        """Where to go back to after a non-finite stop: checkpoints are written from finite states only."""
        latest = latest_checkpoint(self.cfg.checkpoint_dir)
        if latest is None:
            return "no checkpoint was written; start again with a lower train.lr"
        return (f"the last checkpoint, {latest}, was written from a finite state: rerun with checkpoint.resume={latest} "
                f"and a lower train.lr (or the data moved past the bad batches)")

    def save(self) -> str:
        return save_checkpoint(self.cfg.checkpoint_dir, self.step, self.model, self.stepper, self.plan,
                               self.state_dict(), self.cfg.checkpoint.keep_last, self.checkpoint_metadata())

    def save_if_healthy(self) -> bool:
        """Save, unless the last step was skipped as non-finite: a streak of such steps must not
        rotate the checkpoints from before it out of `checkpoint.keep_last`."""
        if self.nonfinite_streak:
            log.warning(f"step {self.step}: no checkpoint written, the step was non-finite "
                        f"({self.nonfinite_streak} in a row); the last one stays {self.cfg.checkpoint_dir}/latest")
            return False
        self.save()
        return True

    def maybe_resume(self) -> str | None:
        """Resume from `checkpoint.resume` (auto: the latest in the checkpoint directory), whatever
        layout wrote it. A weights-only checkpoint (converted from HuggingFace), or any checkpoint
        with `checkpoint.weights_only`, starts at step 0 with a fresh optimizer."""
        c = self.cfg.checkpoint
        path = None if c.resume == "none" else latest_checkpoint(self.cfg.checkpoint_dir) if c.resume == "auto" else c.resume
        if path is not None:
            state = load_checkpoint(path, self.model, self.stepper, self.plan, verify=c.verify,
                                    weights_only=c.weights_only)
            if state is not None:
                self.load_state_dict(state)
        return path

    # ------------------------------------------------------------------ the loop

    def fit(self, preemption: PreemptionSignals | None = None) -> dict:
        """Train to train.steps or the stage's target; with `preemption`, stop after the step in which
        a preemption signal arrived, save a checkpoint and return with "preempted": True."""
        cfg, t = self.cfg, self.cfg.train
        for line in self.plan.table().splitlines() + [f"strategy of {s}" for s in self.plan.strategy_lines()]:
            log.info(line)
        check_checkpoint_space(cfg.checkpoint_dir, self.model, self.stepper, self.plan, cfg.checkpoint.keep_last)
        resumed = self.maybe_resume()
        if resumed:
            log.info(f"{self.log_prefix}resumed from {resumed} at step {self.step}")
        metrics = MetricsWriter(cfg.run_dir, enabled=self.mesh.rank == 0, resume_step=self.step)
        started, start_step, saved_step = time.perf_counter(), self.step, self.step
        if self.step == 0 and (self.evaluates_at_start_and_end or self.eval_interval):
            record = {"step": 0, **self.eval_record()}
            metrics.write(record)
            log.info(f"{self.log_prefix}step 0 | {self.log_fields(record)}")
        preempted = False
        while self.step < t.steps:
            tic = time.perf_counter()
            fields, histograms = self.run_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.step += 1
            record = {"step": self.step, **fields, **self.step_timing(time.perf_counter() - tic)}
            self.count_nonfinite(record, metrics)
            if self.eval_due():
                record.update(self.eval_record())
            metrics.write(record, histograms=histograms)
            if self.step % t.log_interval == 0 or self.step == t.steps:
                rate = (time.perf_counter() - started) / (self.step - start_step)
                log.info(f"{self.log_prefix}step {self.step}/{t.steps} | {self.log_fields(record)} | "
                         f"eta {format_duration(rate * (t.steps - self.step))}")
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 and self.save_if_healthy():
                saved_step = self.step
            if self.reached_target(record):
                log.info(f"{self.log_prefix}target reached at step {self.step}")
                break
            preempted = self.step < t.steps and preemption is not None and preemption.stop_agreed(self.device)
            if preempted:
                log.info(f"{self.log_prefix}stopping after step {self.step} on a preemption signal; saving a "
                         f"checkpoint to resume from")
                break
        if (cfg.checkpoint.save_at_end or preempted) and self.step != saved_step:
            self.save_if_healthy()
        metrics.close()
        return {"steps": self.step, "run_dir": cfg.run_dir, "metrics": metrics.path, "preempted": preempted}

    def eval_due(self) -> bool:
        interval, last = self.eval_interval, self.step == self.cfg.train.steps
        return bool(interval and self.step % interval == 0) or (last and (self.evaluates_at_start_and_end or interval > 0))

    def count_nonfinite(self, record: dict, metrics: MetricsWriter) -> None:
        """Track the streak of skipped steps; stop after train.max_nonfinite_steps of them."""
        if not record.get("skipped"):
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        bad = record.get("nonfinite_tensor")
        log.warning(f"step {self.step}: non-finite {bad} (loss {record.get('loss')}, grad norm "
                    f"{record.get('grad_norm')}); update skipped ({self.nonfinite_streak} in a row)")
        if self.nonfinite_streak >= self.cfg.train.max_nonfinite_steps:
            metrics.write(record)
            metrics.close()
            raise NonFiniteError(f"stopping at step {self.step}: {self.nonfinite_streak} consecutive non-finite steps; "
                                 f"the first non-finite tensor of this step is {bad}; {self.good_checkpoint_advice()}")
