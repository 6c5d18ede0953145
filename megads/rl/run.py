"""What SFT and GRPO share: the policy on the mesh, its optimizer, held-out evaluation,
checkpoints in the layout-free format (resume under any layout) and the step loop that
writes metrics.jsonl / TensorBoard and stops on a preemption signal like pretraining."""
from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch.distributed as dist

from megads.checkpoint import check_checkpoint_space, latest_checkpoint, load_checkpoint, save_checkpoint
from megads.config import Config, lr_at
from megads.data.tokenizer import Tokenizer
from megads.parallel.data import build_step_optimizer
from megads.parallel.mesh import Mesh
from megads.rl.evaluate import greedy_accuracy
from megads.rl.policy import build_policy
from megads.rl.problems import held_out_problems
from megads.train.metrics import MetricsWriter, format_duration
from megads.train.optim import build_optimizer, set_lr
from megads.train.preemption import PreemptionSignals
from megads.train.trainer import resolve_device, resolve_dtype

log = logging.getLogger("megads")


class PolicyRun:
    """Base of the SFT and GRPO trainers; `section` names their config section."""

    section = ""

    def __init__(self, cfg: Config, tokenizer: Tokenizer, mesh: Mesh | None = None, device: torch.device | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.mesh = mesh or Mesh()
        self.device = device or resolve_device(cfg)
        self.dtype = resolve_dtype(cfg, self.device)
        self.settings = getattr(cfg, self.section)
        self.model = build_policy(cfg, self.mesh, self.device, self.settings.init)
        self.optimizer = build_optimizer(self.model, cfg.train, self.device)
        self.stepper = build_step_optimizer(self.model, self.optimizer, self.mesh, self.optimizer_config())
        self.eval_set = held_out_problems(cfg.train.seed, self.settings.tiers, self.settings.eval_problems)
        self.eval_max_new_tokens = 0                   # set by the subclass
        self.step = 0

    def optimizer_config(self) -> Config:
        """The config the optimizer wrapper is built from (its batch sizes feed DeepSpeed's bookkeeping)."""
        return self.cfg

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def evaluate(self) -> dict[str, float]:
        with self.autocast():
            result = greedy_accuracy(self.model, self.tokenizer, self.eval_set, self.mesh, self.eval_max_new_tokens)
        return {f"eval_{k}": v for k, v in result.items()}

    def optimizer_step(self) -> tuple[float, bool]:
        """Apply the accumulated gradients with this step's learning rate; (grad norm, applied)."""
        outcome = self.stepper.step()
        for moe in self.model.moe_layers():
            moe.expert_load.zero_()                    # router biases stay as pretraining left them
        return outcome.grad_norm, outcome.applied

    def mean_over_dp(self, values: dict[str, float]) -> dict[str, float]:
        group = self.mesh.group("dp")
        if group is None or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=group)
        return dict(zip(values, (t / self.mesh.dp).tolist()))

    # ------------------------------------------------------------------ state

    def save(self) -> str:
        state = {"step": self.step, "rng": torch.get_rng_state(), "config": self.cfg.to_dict()}
        return save_checkpoint(self.cfg.checkpoint_dir, self.step, self.model, self.stepper, self.mesh, state,
                               self.cfg.checkpoint.keep_last,
                               {"model_config": dataclasses.asdict(self.cfg.model), "stage": self.section})

    def maybe_resume(self) -> str | None:
        c = self.cfg.checkpoint
        path = None if c.resume == "none" else latest_checkpoint(self.cfg.checkpoint_dir) if c.resume == "auto" else c.resume
        if path is not None:
            state = load_checkpoint(path, self.model, self.stepper, self.mesh, verify=c.verify,
                                    weights_only=c.weights_only)
            if state is not None:
                self.step = state["step"]
                torch.set_rng_state(state["rng"])
        return path

    # ------------------------------------------------------------------ the loop

    def train_step(self) -> dict:
        raise NotImplementedError

    def reached_target(self, record: dict) -> bool:
        """Whether to end the run after the step that produced `record`."""
        return False

    def fit(self, preemption: PreemptionSignals | None = None) -> dict:
        """Train to train.steps or the stage's target; with `preemption`, stop after the step in which
        a preemption signal arrived, save a checkpoint and return with "preempted": True."""
        cfg, t = self.cfg, self.cfg.train
        check_checkpoint_space(cfg.checkpoint_dir, self.model, self.stepper, self.mesh, cfg.checkpoint.keep_last)
        resumed = self.maybe_resume()
        if resumed:
            log.info(f"{self.section}: resumed from {resumed} at step {self.step}")
        metrics = MetricsWriter(cfg.run_dir, enabled=self.mesh.rank == 0, resume_step=self.step)
        started, start_step = time.perf_counter(), self.step
        saved_step = self.step          # the checkpoint resumed from (or none, at step 0)
        preempted = False
        if self.step == 0:
            record = {"step": 0, **self.evaluate()}
            metrics.write(record)
            log.info(f"{self.section} step 0 | held-out greedy accuracy {record['eval_accuracy']:.3f}")
        interval = self.settings.eval_interval
        while self.step < t.steps:
            set_lr(self.optimizer, lr_at(t, self.step))
            tic = time.perf_counter()
            record = {"step": self.step + 1, "lr": lr_at(t, self.step), **self.train_step()}
            record["step_time_s"] = time.perf_counter() - tic
            self.step += 1
            if (interval and self.step % interval == 0) or self.step == t.steps:
                record.update(self.evaluate())
            metrics.write(record)
            if self.step % t.log_interval == 0 or self.step == t.steps:
                rate = (time.perf_counter() - started) / (self.step - start_step)
                shown = " | ".join(f"{k} {v:.4g}" for k, v in record.items()
                                   if k in self.logged_keys and isinstance(v, float))
                log.info(f"{self.section} step {self.step}/{t.steps} | {shown} | eta {format_duration(rate * (t.steps - self.step))}")
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                self.save()
                saved_step = self.step
            if self.reached_target(record):
                log.info(f"{self.section}: target reached at step {self.step}")
                break
            preempted = self.step < t.steps and preemption is not None and preemption.stop_agreed(self.device)
            if preempted:
                log.info(f"{self.section}: stopping after step {self.step} on a preemption signal; "
                         f"saving a checkpoint to resume from")
                break
        if (cfg.checkpoint.save_at_end or preempted) and self.step != saved_step:
            self.save()
        metrics.close()
        return {"steps": self.step, "run_dir": cfg.run_dir, "metrics": metrics.path, "preempted": preempted}

    logged_keys: tuple[str, ...] = ("loss", "eval_accuracy")
