"""GRPO (DeepSeekMath, arXiv 2402.03300) on the parallel model: per step, sample G responses for
each prompt on the training ranks, score them, normalise rewards within each group, and take
`updates_per_batch` (mu) optimizer steps on the clipped surrogate with a KL penalty against a
frozen reference. MoE layers replay the experts chosen at rollout (routing replay).

Each DP rank owns whole groups (prompts_per_step / dp prompts x G responses), so advantages
need no communication; the token-mean loss divides by the global token count, so that the
averaged DP gradient is the single-process one.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
import torch.distributed as dist

from megads.config import Config
from megads.data.tokenizer import Tokenizer
from megads.parallel.mesh import Mesh
from megads.parallel.tensor import vocab_parallel_entropy
from megads.rl.evaluate import rank_slice
from megads.rl.loss import dynamic_sampling_mask, group_advantages, policy_loss
from megads.rl.policy import build_reference, replay_routes, token_logprobs
from megads.rl.problems import encode_prompt, problem_stream, take
from megads.rl.rewards import RewardSet
from megads.rl.rollout import Rollout, SamplingParams, UniformStream, generate
from megads.rl.run import PolicyRun


class GRPOTrainer(PolicyRun):
    section = "grpo"
    logged_keys = ("reward", "accuracy", "zero_spread_frac", "kl", "entropy", "response_len", "logprob_gap_max",
                   "eval_accuracy")

    def __init__(self, cfg: Config, tokenizer: Tokenizer, mesh: Mesh | None = None, device: torch.device | None = None):
        g = cfg.grpo
        super().__init__(cfg, tokenizer, mesh, device)
        self.eval_max_new_tokens = g.max_new_tokens
        self.params = SamplingParams(g.max_new_tokens, g.temperature, g.top_p)
        self.reference = build_reference(cfg, self.mesh, self.device, g.init) if g.kl_beta > 0 else None
        overlong = (g.max_new_tokens, g.overlong_cache) if g.overlong_cache else None
        self.rewards = RewardSet(g.rewards, g.reward_weights, overlong, setting="grpo.rewards")

    def optimizer_config(self) -> Config:
        g = self.cfg.grpo
        batch = g.prompts_per_step * g.group_size
        micro = min(g.micro_batch, batch // self.mesh.dp)
        return dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, global_batch=batch,
                                                                       micro_batch=micro))

    # ------------------------------------------------------------------ rollout and scoring

    def rollout(self, step: int) -> tuple[Rollout, list]:
        """This rank's groups for step `step`: G responses to each of its prompts."""
        g = self.cfg.grpo
        problems = rank_slice(take(problem_stream(f"{self.cfg.train.seed}-grpo-{step}", g.tiers, held_out=False),
                                   g.prompts_per_step), self.mesh)
        prompts = [encode_prompt(self.tokenizer, p) for p in problems for _ in range(g.group_size)]
        n_global = g.prompts_per_step * g.group_size
        uniforms = UniformStream(self.cfg.train.seed * 1_000_003 + step, n_global,
                                 self.mesh.dp_rank * len(prompts), self.device)
        self.model.eval()
        with self.autocast():
            rollout = generate(self.model, prompts, self.params, self.tokenizer.eos_id, self.tokenizer.pad_id,
                               self.mesh, uniforms)
        return rollout, [p for p in problems for _ in range(g.group_size)]

    def score(self, rollout: Rollout, problems: list, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        texts = [self.tokenizer.decode([t for t in r if t != self.tokenizer.eos_id]) for r in rollout.responses()]
        total, per_fn = self.rewards([p.prompt for p in problems], texts, [p.answer for p in problems],
                                     rollout.response_lens.tolist())
        if self.cfg.grpo.shuffle_rewards:        # negative control: rewards no longer belong to their responses
            order = torch.randperm(total.numel(), generator=torch.Generator().manual_seed(step))
            total = total[order]
        return total, per_fn

    # ------------------------------------------------------------------ the update

    def logprobs(self, model, rollout: Rollout, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        replay = rollout.routes if self.cfg.grpo.routing_replay else None
        with torch.set_grad_enabled(grad), replay_routes(model, replay), self.autocast():
            return token_logprobs(model, rollout.tokens, self.cfg.grpo.temperature)

    def micro_batches(self, rollout: Rollout) -> list[slice]:
        n, size = rollout.tokens.shape[0], self.cfg.grpo.micro_batch
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def train_step(self) -> dict:
        g = self.cfg.grpo
        rollout, problems = self.rollout(self.step)
        rewards, per_fn = self.score(rollout, problems, self.step)
        rewards = rewards.to(self.device)
        advantages = group_advantages(rewards, g.group_size, g.advantage)               # [n]
        spread = dynamic_sampling_mask(rewards, g.group_size)                           # [n / G]
        mask = rollout.mask
        if g.dynamic_sampling:
            mask = mask & spread.repeat_interleave(g.group_size)[:, None]
        count = mask.sum().double().reshape(1)
        if self.mesh.group("dp") is not None:
            dist.all_reduce(count, group=self.mesh.group("dp"))
        scale_tokens = max(count.item(), 1.0) / self.mesh.dp          # DP averages gradients
        chunks = self.micro_batches(rollout)
        n = rollout.tokens.shape[0]

        reference, old = [], []
        for rows in chunks:
            part = rollout.select(rows)
            if self.reference is not None:
                reference.append(self.logprobs(self.reference, part, grad=False)[0])
            old.append(self.logprobs(self.model, part, grad=False)[0] if g.old_logprobs == "recompute" else part.logprobs)

        self.model.train()
        sums: dict[str, float] = defaultdict(float)            # token-weighted sums, reduced over DP below
        gap_max = 0.0
        for update in range(g.updates_per_batch):
            for i, rows in enumerate(chunks):
                part = rollout.select(rows)
                logp, logits = self.logprobs(self.model, part, grad=True)
                part_mask = mask[rows]
                loss, stats = policy_loss(
                    logp, old[i], advantages[rows], part_mask, g.clip_low, g.clip_high, g.aggregation,
                    reference[i] if reference else None, g.kl_beta, g.kl_estimator, g.sequence_ratio,
                    loss_scale_tokens=scale_tokens if g.aggregation == "token-mean" else None,
                    norm_len=g.max_new_tokens)
                weight = 1.0 if g.aggregation == "token-mean" else (rows.stop - rows.start) / n
                self.stepper.backward(loss * weight)
                if update == 0:
                    sampled = part.mask.sum().item()
                    gap = (logp.detach() - part.logprobs).abs().masked_fill(~part.mask, 0.0)
                    sums["loss"] += loss.item() * weight
                    sums["entropy"] += vocab_parallel_entropy(logits, part.mask, self.mesh).item() * sampled
                    sums["logprob_gap_mean"] += gap.sum().item()
                    sums["sampled_tokens"] += sampled
                    gap_max = max(gap_max, gap.max().item())
                    if "kl" in stats:
                        sums["kl"] += stats["kl"].item() * part_mask.sum().item()
                # at the first update the ratio is 1: the clip fractions are means over all mu updates
                for key in ("clip_frac_low", "clip_frac_high"):
                    sums[key] += stats[key].item() * part_mask.sum().item() / g.updates_per_batch
            grad_norm, applied = self.optimizer_step()
            sums["skipped"] += float(not applied)
        sums = {k: v * self.mesh.dp for k, v in self.mean_over_dp(dict(sums)).items()}      # sums over DP
        sampled = sums.pop("sampled_tokens")
        record = {"loss": sums["loss"] / self.mesh.dp, "skipped": sums["skipped"] / self.mesh.dp,
                  "entropy": sums["entropy"] / sampled, "logprob_gap_mean": sums["logprob_gap_mean"] / sampled,
                  **{k: sums[k] / max(count.item(), 1.0) for k in ("clip_frac_low", "clip_frac_high", "kl") if k in sums}}
        per_sequence = {"reward": rewards.mean().item(), "zero_spread_frac": 1.0 - spread.float().mean().item(),
                        "response_len": rollout.response_lens.float().mean().item(),
                        **{f"reward/{k}": v.mean().item() for k, v in per_fn.items()}}
        if "accuracy" in per_fn:
            per_sequence["accuracy"] = per_fn["accuracy"].mean().item()
        record.update(self.mean_over_dp(per_sequence))             # equal sequences per rank: the global mean
        record["logprob_gap_max"] = self.max_over_world(gap_max)
        record["grad_norm"] = grad_norm
        return record

    def max_over_world(self, value: float) -> float:
        if self.mesh.world_size == 1:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()
