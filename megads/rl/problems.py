"""Prompts and answers for SFT and GRPO from the synthetic arithmetic corpus, with a fixed
train / held-out split: a problem is held out iff a hash of its prompt falls in the held-out
tenth, so no held-out prompt is ever trained on, whatever the seeds."""
from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence

from megads.data.synthetic import Problem, make_problem
from megads.data.tokenizer import Tokenizer

HELD_OUT_BUCKETS = 10          # one bucket of ten is held out


def is_held_out(problem: Problem) -> bool:
    digest = hashlib.sha256(problem.prompt.encode()).digest()
    return digest[0] % HELD_OUT_BUCKETS == 0


def problem_stream(seed: int | str, tiers: Sequence[int], held_out: bool) -> Iterator[Problem]:
    """Infinite deterministic stream of problems of `tiers` (uniformly), from one side of the split.
    Training draws a fresh stream per step, seeded by (seed, step), so resuming needs no state."""
    rng = random.Random(f"megads-problems-{seed}-{held_out}")
    while True:
        problem = make_problem(rng, rng.choice(list(tiers)))
        if is_held_out(problem) == held_out:
            yield problem


def take(stream: Iterator[Problem], n: int) -> list[Problem]:
    return [next(stream) for _ in range(n)]


def held_out_problems(seed: int, tiers: Sequence[int], n: int) -> list[Problem]:
    """The first `n` held-out problems (distinct prompts) of `tiers`: the evaluation set."""
    seen: dict[str, Problem] = {}
    for problem in problem_stream(seed, tiers, held_out=True):
        seen.setdefault(problem.prompt, problem)
        if len(seen) == n:
            return list(seen.values())
    raise AssertionError("unreachable: the stream is infinite")


def encode_prompt(tokenizer: Tokenizer, problem: Problem) -> list[int]:
    """eos (the document separator of pretraining) + the prompt, as at a document start."""
    return [tokenizer.eos_id] + tokenizer.encode(problem.prompt)


def encode_example(tokenizer: Tokenizer, problem: Problem) -> tuple[list[int], int]:
    """Prompt + response + eos token ids, and the prompt's length (the tokens without loss)."""
    prompt = encode_prompt(tokenizer, problem)
    return prompt + tokenizer.encode(problem.response) + [tokenizer.eos_id], len(prompt)
