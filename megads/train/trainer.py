"""Pretraining, the stage of the shared loop (train/loop.py) that takes packed token batches:
micro-batch accumulation or a pipeline schedule, the optimizer step with router-bias balancing,
validation loss, throughput metrics. No maths of its own lives here."""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megads.config import Config, lr_at, schedule_value
from megads.data import BatchLoader, PackedSequences, PreparedData
from megads.model.moe import balance_loss_scale
from megads.parallel.builder import build_model
from megads.parallel.expert import AllToAllExchange
from megads.parallel.data import build_step_optimizer
from megads.parallel.mesh import Mesh
from megads.parallel.pipeline.schedules import forward_pass
from megads.train.loop import TrainingLoop
from megads.train.metrics import flops_per_token, memory_gib, peak_flops
from megads.train.optim import build_optimizer, set_lr

log = logging.getLogger("megads")


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


class Trainer(TrainingLoop):
    evaluates_at_start_and_end = False       # train.eval_interval=0 switches validation off

    def __init__(self, cfg: Config, data: PreparedData, mesh: Mesh | None = None, device: torch.device | None = None):
        super().__init__(cfg, mesh, device)
        t = cfg.train
        self.built = build_model(cfg, self.mesh, self.device, self.autocast, dtype=self.dtype)
        # Under PP the rank keeps its stages only (global names; the plan knows which copies are mirrors).
        self.model, self.plan, self.pipeline = self.built.model, self.built.plan, self.built.pipeline
        for moe in self.model.moe_layers():
            moe.balance_alpha = t.seq_aux_alpha
        self.optimizer = build_optimizer(self.model, self.plan, t, self.device)
        self.stepper = build_step_optimizer(self.model, self.optimizer, self.plan, cfg)
        eos = data.tokenizer.eos_id
        self.train_batches = BatchLoader(PackedSequences(data.train, t.seq_len, t.seed, eos), t.global_batch,
                                         t.micro_batch, self.mesh.dp_rank, self.mesh.dp)
        self.valid_sequences = PackedSequences(data.valid, t.seq_len, t.seed, eos)
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.peak_flops = peak_flops(self.device, t.peak_tflops)

    # ------------------------------------------------------------------ one optimizer step

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
            if outcome.applied:
                self.built.weights_changed()       # the weights' FP8 blocks and bf16 copies are stale
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
            exchange = moe.experts.strategy.exchange
            if isinstance(exchange, AllToAllExchange):
                sent += exchange.stats.tokens_sent_off_rank
                nodes = max(nodes, int(exchange.stats.max_nodes_per_token))
                exchange.stats.tokens_sent_off_rank = 0
                exchange.stats.max_nodes_per_token.zero_()
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

    # ------------------------------------------------------------------ the stage's hooks

    @property
    def eval_interval(self) -> int:
        return self.cfg.train.eval_interval

    def run_step(self) -> tuple[dict, dict]:
        result = self.train_step(self.train_batches.next_step())
        record = {"loss": result.loss, "lm_loss": result.lm_loss, "mtp_loss": result.mtp_loss,
                  "balance_loss": result.balance_loss, "lr": lr_at(self.cfg.train, self.step), "grad_norm": result.grad_norm,
                  "max_load_ratio": result.max_load_ratio, "skipped": result.skipped}
        if result.skipped:
            record["nonfinite_tensor"] = result.bad_tensor
        for name, load in (result.loads or {}).items():
            if load.sum() > 0:
                record[f"load/{name}/max_mean"] = (load.max() / load.mean()).item()
                record[f"load/{name}/min_mean"] = (load.min() / load.mean()).item()
        if self.mesh.ep > 1:
            record["tokens_off_rank"] = result.tokens_off_rank
            record["max_nodes_per_token"] = result.max_nodes_per_token
        return record, {f"load/{name}": load for name, load in (result.loads or {}).items()}

    def step_timing(self, seconds: float) -> dict:
        tokens = self.cfg.train.global_batch * self.cfg.train.seq_len
        return {"tokens_per_s": tokens / seconds, "mfu": tokens * self.flops_per_token / seconds / self.peak_flops,
                "memory_gib": memory_gib(self.device)}

    def eval_record(self) -> dict:
        return {"valid_loss": self.evaluate()}

    def log_fields(self, record: dict) -> str:
        shown = [f"loss {record['loss']:.4f}"] if "loss" in record else []
        if "valid_loss" in record:
            shown.append(f"valid {record['valid_loss']:.4f}")
        if "loss" in record:
            shown += [f"lr {record['lr']:.2e}", f"grad {record['grad_norm']:.3f}",
                      f"{record['tokens_per_s'] / 1e3:.1f}k tok/s", f"mfu {100 * record['mfu']:.1f}%",
                      f"mem {record['memory_gib']:.2f} GiB"]
        return " | ".join(shown)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "data": self.train_batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.train_batches.load_state_dict(state["data"])

    def maybe_resume(self) -> str | None:
        path = super().maybe_resume()
        if path is not None:
            self.built.weights_changed()       # weights are written through .data: no _version bump
        return path
