"""The pretraining loop: micro-batch accumulation, clipping, AdamW, router-bias balancing,
non-finite step skipping, validation, metrics and checkpoints. No maths of its own lives here."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megads.checkpoint import check_checkpoint_space, latest_checkpoint, load_checkpoint, save_checkpoint
from megads.config import Config, lr_at, schedule_value
from megads.data import BatchLoader, PackedSequences, PreparedData
from megads.fp8 import apply_fp8
from megads.model.deepseek_v3 import DeepSeekV3
from megads.model.moe import balance_loss_scale
from megads.parallel.data import build_step_optimizer
from megads.parallel.expert import parallelize_experts
from megads.parallel.mesh import Mesh
from megads.parallel.pipeline.build import build_pipeline
from megads.parallel.pipeline.schedules import forward_pass
from megads.parallel.tensor import parallelize_tensor
from megads.train.metrics import MetricsWriter, flops_per_token, format_duration, memory_gib, peak_flops
from megads.train.optim import build_optimizer, set_lr
from megads.train.preemption import PreemptionSignals

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
    loads: dict | None = None   # MoE layer name -> tokens per expert this step (summed over the stage)
    tokens_off_rank: int = 0    # token copies the expert all-to-all sent to other ranks
    max_nodes_per_token: int = 0  # the most EP nodes one token was sent to (node-limited routing)


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cpu")


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.train.dtype]


class Trainer:
    def __init__(self, cfg: Config, data: PreparedData, mesh: Mesh | None = None, device: torch.device | None = None):
        self.cfg = cfg
        self.mesh = mesh or Mesh()
        self.device = device or resolve_device(cfg)
        self.dtype = resolve_dtype(cfg, self.device)
        t = cfg.train
        torch.manual_seed(t.seed)
        # Every rank builds and initialises the whole model identically, then keeps its shards.
        self.model = DeepSeekV3(cfg.model).to(self.device)
        self.model.init_weights()
        parallelize_tensor(self.model, self.mesh, cfg.parallel.sequence_parallel)
        parallelize_experts(self.model, self.mesh, cfg.parallel.sequence_parallel)
        self.fp8_recipe = apply_fp8(self.model, cfg.fp8)  # on the local shards: FP8 GEMMs see TP / EP slices
        # Under PP the rank keeps its stages only (global names; mirrored copies marked `pipeline_mirror`).
        self.pipeline = build_pipeline(self.model, cfg, self.mesh, self.autocast) if self.mesh.pp > 1 else None
        for moe in self.model.moe_layers():
            moe.balance_alpha = t.seq_aux_alpha
        self.optimizer = build_optimizer(self.model, t, self.device)
        self.stepper = build_step_optimizer(self.model, self.optimizer, self.mesh, cfg)
        eos = data.tokenizer.eos_id
        self.train_batches = BatchLoader(PackedSequences(data.train, t.seq_len, t.seed, eos), t.global_batch,
                                         t.micro_batch, self.mesh.dp_rank, self.mesh.dp)
        self.valid_sequences = PackedSequences(data.valid, t.seq_len, t.seed, eos)
        self.step = 0
        self.nonfinite_streak = 0
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.peak_flops = peak_flops(self.device, t.peak_tflops)

    # ------------------------------------------------------------------ one optimizer step

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def train_step(self, micro_batches: list[torch.Tensor]) -> StepResult:
        """Forward/backward over this rank's micro-batches of one global batch, then one update."""
        t, model = self.cfg.train, self.model
        model.train()
        set_lr(self.optimizer, lr_at(t, self.step))
        mtp_weight = schedule_value(t.mtp_loss_weight, self.step)
        if self.pipeline is not None:
            trace = [] if self.step + 1 == self.cfg.parallel.pipeline_trace_step else None
            totals = self.pipeline.train_step(micro_batches, mtp_weight, trace)
            if trace is not None:
                self.write_pipeline_trace(trace)
        else:
            totals = self.forward_backward(micro_batches, mtp_weight)
        loss, lm_loss, mtp_loss, balance_loss = self.mean_over_dp(totals).tolist()
        loads = self.reduce_expert_loads()
        load_ratio = max(((load.max() / load.mean()).item() for load in loads if load.sum() > 0), default=1.0)
        if math.isfinite(loss):
            outcome = self.stepper.step()
            if self.fp8_recipe is not None:
                self.fp8_recipe.clear()            # the weights' FP8 copies are stale after an update
        else:
            self.stepper.zero_grad()
            outcome = None
        applied = outcome is not None and outcome.applied
        if applied:
            self.check_weights_finite()
            gamma = schedule_value(t.bias_update_speed, self.step)
            for moe, load in zip(model.moe_layers(), loads):
                moe.update_bias(load, gamma, t.bias_recenter)
        for moe in model.moe_layers():
            moe.expert_load.zero_()
        bad = None if applied else "loss" if outcome is None else outcome.bad_tensor
        grad_norm = outcome.grad_norm if outcome is not None else float("nan")
        names = [name for name, _ in model.named_moe_layers()]
        return StepResult(loss, lm_loss, mtp_loss, balance_loss, grad_norm, load_ratio, not applied, bad,
                          dict(zip(names, [load.cpu() for load in loads])), *self.routing_traffic())

    def forward_backward(self, micro_batches: list[torch.Tensor], mtp_weight: float) -> torch.Tensor:
        """Gradients of the step's loss accumulated over micro-batches (no pipeline); returns
        [loss + balance, lm, mtp, balance], means over the micro-batches."""
        model, n = self.model, len(micro_batches)
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        with balance_loss_scale(1.0 / n):
            for batch in micro_batches:
                batch = batch.to(self.device, non_blocking=True)
                with self.autocast():
                    out = model(batch[:, :-1], batch[:, 1:], mtp_weight)
                balance = sum((m.last_balance_loss for m in model.moe_layers()), torch.zeros((), device=self.device))
                self.stepper.backward(out.loss / n)
                totals += torch.stack([out.loss.detach() + balance, out.lm_loss.detach(), out.mtp_loss.detach(),
                                       balance]).double() / n
        return totals

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

    def write_pipeline_trace(self, spans: list) -> None:
        """<run_dir>/pipeline_trace.json: per pipeline rank (of the first DP / TP replica) its
        actions' [name, start, end] in seconds; `tools/plot_schedule.py --measured` draws it."""
        ranks = [None] * self.mesh.pp
        dist.all_gather_object(ranks, spans, group=self.mesh.group("pp"))
        if self.mesh.rank == 0:
            path = os.path.join(self.cfg.run_dir, "pipeline_trace.json")
            os.makedirs(self.cfg.run_dir, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(ranks, f)
            os.replace(path + ".tmp", path)
            log.info(f"pipeline timeline of step {self.step + 1} written to {path} "
                     f"(python tools/plot_schedule.py {self.cfg.parallel.pipeline_schedule} --pp {self.mesh.pp} "
                     f"--micro-batches {self.pipeline.schedule.n_micro} --measured {path} --out timeline.png)")

    def routing_traffic(self) -> tuple[int, int]:
        """Token copies sent to other EP ranks this step (summed over all ranks) and the most EP
        nodes one token was sent to (max over layers and ranks); both counters are reset."""
        sent, nodes = 0, 0
        for moe in self.model.moe_layers():
            experts = moe.experts
            if hasattr(experts, "tokens_sent_off_rank"):
                sent += experts.tokens_sent_off_rank
                nodes = max(nodes, int(experts.max_nodes_per_token))
                experts.tokens_sent_off_rank = 0
                experts.max_nodes_per_token.zero_()
        totals = torch.tensor([float(sent), float(nodes)], device=self.device)
        if self.mesh.ep > 1:
            dist.all_reduce(totals[:1])
            dist.all_reduce(totals[1:], op=dist.ReduceOp.MAX)
        return int(totals[0].item()), int(totals[1].item())

    def mean_over_dp(self, values: torch.Tensor) -> torch.Tensor:
        """Average per-rank statistics over data-parallel ranks (TP ranks already agree)."""
        group = self.mesh.group("dp")
        if group is not None:
            values = values.clone()
            dist.all_reduce(values, group=group)
            values /= self.mesh.dp
        return values.cpu()

    def reduce_expert_loads(self) -> list[torch.Tensor]:
        """This step's tokens per expert for every MoE layer, summed over the ranks of the stage
        (under TP without SP each token is counted tp times, which changes no sign or ratio)."""
        loads = [m.expert_load.clone() for m in self.model.moe_layers()]
        group = self.mesh.group("stage")
        if group is not None and loads:
            flat = torch.cat(loads)
            dist.all_reduce(flat, group=group)
            loads = list(flat.split([load.numel() for load in loads]))
        return loads

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over the first eval_batches micro-batches of the held-out stream."""
        t = self.cfg.train
        self.model.eval()
        batches = [torch.stack([self.valid_sequences[i * t.micro_batch + j] for j in range(t.micro_batch)])
                   for i in range(t.eval_batches)]
        if self.pipeline is not None:
            schedule = forward_pass(self.pipeline.schedule, len(batches))
            return self.pipeline.evaluate(batches, schedule).item() / len(batches)
        losses = []
        for batch in batches:
            batch = batch.to(self.device)
            with self.autocast():
                losses.append(self.model(batch[:, :-1], batch[:, 1:]).lm_loss.float().item())
        return sum(losses) / len(losses)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Trainer state besides the model and optimizer tensors (those are saved per global tensor)."""
        state = {"step": self.step, "nonfinite_streak": self.nonfinite_streak,
                 "data": self.train_batches.state_dict(), "rng": torch.get_rng_state(), "config": self.cfg.to_dict()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.nonfinite_streak = state["nonfinite_streak"]
        self.train_batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def save(self) -> str:
        return save_checkpoint(self.cfg.checkpoint_dir, self.step, self.model, self.stepper, self.mesh, self.state_dict(),
                               self.cfg.checkpoint.keep_last, {"model_config": dataclasses.asdict(self.cfg.model)})

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
            state = load_checkpoint(path, self.model, self.stepper, self.mesh, verify=c.verify,
                                    weights_only=c.weights_only)
            if self.fp8_recipe is not None:
                self.fp8_recipe.clear()            # weights are written through .data: no _version bump
            if state is not None:
                self.load_state_dict(state)
        return path

    # ------------------------------------------------------------------ the loop

    def fit(self, preemption: PreemptionSignals | None = None) -> dict:
        """Train to train.steps; with `preemption`, stop after the step in which a preemption signal
        arrived, save a checkpoint and return with "preempted": True."""
        cfg, t = self.cfg, self.cfg.train
        check_checkpoint_space(cfg.checkpoint_dir, self.model, self.stepper, self.mesh, cfg.checkpoint.keep_last)
        resumed = self.maybe_resume()
        if resumed:
            log.info(f"resumed from {resumed} at step {self.step}")
        metrics = MetricsWriter(cfg.run_dir, enabled=self.mesh.rank == 0, resume_step=self.step)
        tokens_per_step = t.global_batch * t.seq_len
        started, start_step = time.perf_counter(), self.step
        saved_step = self.step          # the checkpoint resumed from (or none, at step 0)
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
            for name, load in (result.loads or {}).items():
                if load.sum() > 0:
                    record[f"load/{name}/max_mean"] = (load.max() / load.mean()).item()
                    record[f"load/{name}/min_mean"] = (load.min() / load.mean()).item()
            if self.mesh.ep > 1:
                record["tokens_off_rank"] = result.tokens_off_rank
                record["max_nodes_per_token"] = result.max_nodes_per_token
            if result.skipped:
                self.nonfinite_streak += 1
                log.warning(f"step {self.step}: non-finite {result.bad_tensor} (loss {result.loss}, grad norm "
                            f"{result.grad_norm}); update skipped ({self.nonfinite_streak} in a row)")
                if self.nonfinite_streak >= t.max_nonfinite_steps:
                    metrics.write(record)
                    metrics.close()
                    raise NonFiniteError(f"stopping at step {self.step}: {self.nonfinite_streak} consecutive non-finite "
                                         f"steps; the first non-finite tensor of this step is {result.bad_tensor}; "
                                         f"{self.good_checkpoint_advice()}")
            else:
                self.nonfinite_streak = 0
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps):
                record["valid_loss"] = self.evaluate()
            metrics.write(record, histograms={f"load/{name}": load for name, load in (result.loads or {}).items()})
            if self.step % t.log_interval == 0 or self.step == t.steps:
                rate = (time.perf_counter() - started) / (self.step - start_step)
                valid = f" | valid {record['valid_loss']:.4f}" if "valid_loss" in record else ""
                log.info(f"step {self.step}/{t.steps} | loss {result.loss:.4f}{valid} | lr {record['lr']:.2e} | "
                         f"grad {result.grad_norm:.3f} | {record['tokens_per_s'] / 1e3:.1f}k tok/s | "
                         f"mfu {100 * record['mfu']:.1f}% | mem {record['memory_gib']:.2f} GiB | "
                         f"eta {format_duration(rate * (t.steps - self.step))}")
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 and self.save_if_healthy():
                saved_step = self.step
            if preemption is not None and preemption.stop_agreed(self.device):
                log.info(f"stopping after step {self.step} on a preemption signal; saving a checkpoint to resume from")
                break
        preempted = self.step < t.steps
        if (cfg.checkpoint.save_at_end or preempted) and self.step != saved_step:
            self.save_if_healthy()
        metrics.close()
        return {"steps": self.step, "run_dir": cfg.run_dir, "metrics": metrics.path, "preempted": preempted}
