"""Supervised fine-tuning on prompt / response pairs, the loss on response tokens only (the
cold start that gives GRPO a policy whose sampled answers are sometimes right)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megads.config import Config
from megads.data.tokenizer import Tokenizer
from megads.parallel.mesh import Mesh
from megads.rl.evaluate import rank_slice
from megads.rl.policy import token_logprobs
from megads.rl.problems import encode_example, problem_stream
from megads.rl.run import PolicyRun


def pad_examples(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[(ids, prompt_len)] -> tokens [n, L] right-padded, loss mask [n, L-1] over response targets."""
    length = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), length - 1, dtype=torch.bool)
    for i, (ids, prompt_len) in enumerate(examples):
        tokens[i, :len(ids)] = torch.tensor(ids)
        mask[i, prompt_len - 1:len(ids) - 1] = True
    return tokens, mask


class SFTTrainer(PolicyRun):
    section = "sft"

    def __init__(self, cfg: Config, tokenizer: Tokenizer, mesh: Mesh | None = None, device: torch.device | None = None):
        super().__init__(cfg, tokenizer, mesh, device)
        self.eval_max_new_tokens = self.settings.max_len

    def reached_target(self, record: dict) -> bool:
        target = self.settings.stop_at_accuracy
        return target is not None and record.get("eval_accuracy", 0.0) >= target

    def step_examples(self, step: int) -> list[tuple[list[int], int]]:
        """This DP rank's share of the global batch of step `step` (examples over sft.max_len skipped)."""
        examples = []
        for problem in problem_stream(f"{self.cfg.train.seed}-sft-{step}", self.settings.tiers, held_out=False):
            ids, prompt_len = encode_example(self.tokenizer, problem)
            if len(ids) <= self.settings.max_len:
                examples.append((ids, prompt_len))
            if len(examples) == self.cfg.train.global_batch:
                return rank_slice(examples, self.mesh)
        raise AssertionError("unreachable: the stream is infinite")

    def train_step(self) -> dict:
        t = self.cfg.train
        self.model.train()
        tokens, mask = pad_examples(self.step_examples(self.step), self.tokenizer.pad_id)
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        count = mask.sum().double().reshape(1)
        if self.mesh.group("dp") is not None:
            dist.all_reduce(count, group=self.mesh.group("dp"))
        # Sum of response-token losses / global response tokens; x dp because DP averages gradients.
        scale = self.mesh.dp / count.item()
        total = 0.0
        for rows in torch.arange(tokens.shape[0]).split(t.micro_batch):
            with self.autocast():
                logp, _ = token_logprobs(self.model, tokens[rows], 1.0)
            loss = -(logp * mask[rows]).sum() * scale
            self.stepper.backward(loss)
            total += loss.item()
        grad_norm, applied = self.optimizer_step()
        return {"loss": self.mean_over_dp({"loss": total})["loss"],
                "grad_norm": grad_norm, "response_tokens": count.item(), "skipped": not applied}
