"""What SFT and GRPO share: the policy on the mesh, its optimizer, held-out greedy evaluation,
and their place in the shared training loop (train/loop.py): checkpoints in the layout-free
format, metrics, non-finite steps and preemption as in pretraining."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megads.config import Config, lr_at
from megads.data.tokenizer import Tokenizer
from megads.parallel.data import build_step_optimizer
from megads.parallel.mesh import Mesh
from megads.rl.evaluate import greedy_accuracy
from megads.rl.policy import build_policy
from megads.rl.problems import held_out_problems
from megads.train.loop import TrainingLoop
from megads.train.optim import build_optimizer, set_lr


class PolicyRun(TrainingLoop):
    """Base of the SFT and GRPO trainers; `section` names their config section."""

    section = ""
    logged_keys: tuple[str, ...] = ("loss", "eval_accuracy")

    def __init__(self, cfg: Config, tokenizer: Tokenizer, mesh: Mesh | None = None, device: torch.device | None = None):
        super().__init__(cfg, mesh, device)
        self.tokenizer = tokenizer
        self.settings = getattr(cfg, self.section)
        self.log_prefix = f"{self.section} "
        self.model, self.plan = build_policy(cfg, self.mesh, self.device, self.settings.init)
        self.optimizer = build_optimizer(self.model, self.plan, cfg.train, self.device)
        self.stepper = build_step_optimizer(self.model, self.optimizer, self.plan, self.optimizer_config())
        self.eval_set = held_out_problems(cfg.train.seed, self.settings.tiers, self.settings.eval_problems)
        self.eval_max_new_tokens = 0                   # set by the subclass

    def optimizer_config(self) -> Config:
        """The config the optimizer wrapper is built from (its batch sizes feed DeepSpeed's bookkeeping)."""
        return self.cfg

    def train_step(self) -> dict:
        """One step of the stage: its metrics record, with "skipped" (the updates skipped as non-finite)."""
        raise NotImplementedError

    def optimizer_step(self) -> tuple[float, bool]:
        """Apply the accumulated gradients with this step's learning rate; (grad norm, applied)."""
        outcome = self.stepper.step()
        for moe in self.model.moe_layers():
            moe.expert_load.zero_()                    # router biases stay as pretraining left them
        if outcome.applied:
            self.check_weights_finite()
        else:
            self.last_nonfinite = outcome.bad_tensor
        return outcome.grad_norm, outcome.applied

    def mean_over_dp(self, values: dict[str, float]) -> dict[str, float]:
        group = self.mesh.group("dp")
        if group is None or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=group)
        return dict(zip(values, (t / self.mesh.dp).tolist()))

    # ------------------------------------------------------------------ the stage's hooks

    @property
    def eval_interval(self) -> int:
        return self.settings.eval_interval

    def run_step(self) -> tuple[dict, dict]:
        set_lr(self.optimizer, lr_at(self.cfg.train, self.step))
        self.last_nonfinite = None
        record = {"lr": lr_at(self.cfg.train, self.step), **self.train_step()}
        if record.get("skipped"):
            record["nonfinite_tensor"] = self.last_nonfinite
        return record, {}

    def eval_record(self) -> dict:
        with self.autocast():
            result = greedy_accuracy(self.model, self.tokenizer, self.eval_set, self.mesh, self.eval_max_new_tokens)
        return {f"eval_{k}": v for k, v in result.items()}

    def log_fields(self, record: dict) -> str:
        if record["step"] == 0:
            return f"held-out greedy accuracy {record['eval_accuracy']:.3f}"
        return " | ".join(f"{k} {v:.4g}" for k, v in record.items() if k in self.logged_keys and isinstance(v, float))

    def checkpoint_metadata(self) -> dict:
        return {**super().checkpoint_metadata(), "stage": self.section}
