"""Held-out greedy accuracy: the number SFT and GRPO are judged by."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megads.data.synthetic import Problem
from megads.data.tokenizer import Tokenizer
from megads.model.deepseek_v3 import DeepSeekV3
from megads.parallel.mesh import Mesh
from megads.rl.problems import encode_prompt
from megads.rl.rewards import accuracy_reward, format_reward
from megads.rl.rollout import SamplingParams, generate


def rank_slice(items: list, mesh: Mesh) -> list:
    """This DP rank's contiguous share of `items` (TP ranks of one replica get the same)."""
    per_rank = len(items) // mesh.dp
    return items[mesh.dp_rank * per_rank:(mesh.dp_rank + 1) * per_rank]


@torch.no_grad()
def greedy_accuracy(model: DeepSeekV3, tokenizer: Tokenizer, problems: list[Problem], mesh: Mesh,
                    max_new_tokens: int, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Greedy decoding of every problem (split over DP ranks): exact-answer accuracy and
    well-formed fraction over all of them. Collective over the world."""
    mine = rank_slice(problems, mesh)
    rollout = generate(model, [encode_prompt(tokenizer, p) for p in mine], SamplingParams(max_new_tokens, 0.0),
                       tokenizer.eos_id, tokenizer.pad_id, mesh, dtype=dtype)
    texts = [tokenizer.decode([t for t in r if t != tokenizer.eos_id]) for r in rollout.responses()]
    sums = torch.tensor([sum(accuracy_reward(t, p.answer) for t, p in zip(texts, mine)),
                         sum(format_reward(t) for t in texts), float(len(mine))], dtype=torch.float64,
                        device=model.lm_head.weight.device)
    group = mesh.group("dp")
    if group is not None:
        dist.all_reduce(sums, group=group)
    return {"accuracy": (sums[0] / sums[2]).item(), "format": (sums[1] / sums[2]).item()}
