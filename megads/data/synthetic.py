"""Deterministic synthetic corpus: arithmetic problems with worked steps plus simple English filler."""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

NUM_TIERS = 4
TIER_WEIGHTS = (0.35, 0.3, 0.2, 0.15)  # easy tiers dominate so a tiny model learns them well


@dataclass(frozen=True)
class Problem:
    prompt: str    # "Question: 17 + 25 * 3 = ?\n"
    response: str  # "<think>25 * 3 = 75. 17 + 75 = 92.</think><answer>92</answer>"
    answer: str    # "92"
    tier: int


@dataclass(frozen=True)
class _TierSpec:
    n_ops: int
    ops: tuple[str, ...]
    add_range: tuple[int, int]  # operands not touching a "*"
    mul_range: tuple[int, int]  # operands of a "*"
    need_mul: bool              # at least one "*" and at least one "+"/"-"


_TIERS = (
    _TierSpec(1, ("+",), (0, 99), (0, 0), False),
    _TierSpec(1, ("-", "*"), (0, 99), (0, 12), False),
    _TierSpec(2, ("+", "-", "*"), (0, 99), (2, 12), True),
    _TierSpec(3, ("+", "-", "*"), (0, 999), (2, 20), True),
)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _solve(nums: list[int], ops: list[str]) -> tuple[list[str], int] | None:
    """Evaluate with precedence ("*" first, then left to right); returns (steps, result) or None
    if an intermediate value goes negative."""
    nums, ops, steps = list(nums), list(ops), []
    while ops:
        i = ops.index("*") if "*" in ops else 0
        value = _apply(nums[i], ops[i], nums[i + 1])
        if value < 0:
            return None
        steps.append(f"{nums[i]} {ops[i]} {nums[i + 1]} = {value}.")
        nums[i : i + 2] = [value]
        del ops[i]
    return steps, nums[0]


def make_problem(rng: random.Random, tier: int) -> Problem:
    """One arithmetic problem of difficulty `tier` (0..3), drawn from `rng`."""
    if not 0 <= tier < NUM_TIERS:
        raise ValueError(f"tier must be in [0, {NUM_TIERS}), got {tier}")
    spec = _TIERS[tier]
    while True:  # rejection sampling: deterministic given rng
        ops = [rng.choice(spec.ops) for _ in range(spec.n_ops)]
        if spec.need_mul and ("*" not in ops or all(op == "*" for op in ops)):
            continue
        nums = []
        for k in range(spec.n_ops + 1):
            touches_mul = (k > 0 and ops[k - 1] == "*") or (k < spec.n_ops and ops[k] == "*")
            nums.append(rng.randint(*(spec.mul_range if touches_mul else spec.add_range)))
        solved = _solve(nums, ops)
        if solved is None:
            continue
        steps, result = solved
        expr = " ".join(str(x) for pair in itertools.zip_longest(nums, ops) for x in pair if x is not None)
        return Problem(
            prompt=f"Question: {expr} = ?\n",
            response=f"<think>{' '.join(steps)}</think><answer>{result}</answer>",
            answer=str(result),
            tier=tier,
        )


_ADJ = ("red", "big", "small", "blue", "old", "happy", "green", "little")
_NOUN = ("cat", "dog", "bird", "fox", "girl", "boy", "frog", "cow")
_VERB = ("sat", "ran", "slept", "jumped", "walked", "looked")
_PREP = ("on", "to", "in", "under", "near", "by")
_PLACE = ("mat", "park", "house", "tree", "box", "river", "hill", "bed")
_OBJ = ("ball", "hat", "book", "cake", "toy", "cup")


def _sentence(rng: random.Random) -> str:
    c = rng.choice
    templates = (
        lambda: f"the {c(_ADJ)} {c(_NOUN)} {c(_VERB)} {c(_PREP)} the {c(_PLACE)}.",
        lambda: f"the {c(_NOUN)} is {c(_ADJ)}.",
        lambda: f"a {c(_NOUN)} has a {c(_ADJ)} {c(_OBJ)}.",
        lambda: f"the {c(_NOUN)} and the {c(_NOUN)} {c(_VERB)} {c(_PREP)} the {c(_PLACE)}.",
    )
    return c(templates)()


def _filler(rng: random.Random) -> str:
    """2-6 sentences, sometimes split over lines (never a blank line)."""
    parts = []
    for k in range(rng.randint(2, 6)):
        if k:
            parts.append("\n" if rng.random() < 0.25 else " ")
        parts.append(_sentence(rng))
    return "".join(parts)


def iter_documents(seed: int, filler_fraction: float = 0.2) -> Iterator[str]:
    """Infinite deterministic document stream; documents contain no blank line and no trailing newline."""
    rng = random.Random(seed)
    while True:
        if rng.random() < filler_fraction:
            yield _filler(rng)
        else:
            p = make_problem(rng, rng.choices(range(NUM_TIERS), weights=TIER_WEIGHTS)[0])
            yield p.prompt + p.response


def generate_documents(seed: int, n_docs: int, filler_fraction: float = 0.2) -> list[str]:
    """First `n_docs` documents of the stream for `seed`."""
    return list(itertools.islice(iter_documents(seed, filler_fraction), n_docs))


_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def extract_answer(text: str) -> str | None:
    """Stripped content of the first <answer>...</answer>; None if absent, unclosed or empty.
    Two str.find calls: linear in len(text) however many tags it repeats."""
    start = text.find("<answer>")
    end = text.find("</answer>", start + len("<answer>")) if start >= 0 else -1
    if end < 0:
        return None
    return text[start + len("<answer>"):end].strip() or None


def format_ok(text: str) -> bool:
    """True iff text is exactly "<think>...</think><answer>...</answer>" (outer whitespace allowed,
    and whitespace between the blocks), no nested/extra tags and a non-empty answer.

    Linear-time: a valid text's think block ends at its first "</think>" and its answer block at
    the text's end, so each block is found by one scan (no backtracking over repeated tags)."""
    body = text.strip()
    if not (body.startswith("<think>") and body.endswith("</answer>")):
        return False
    think_end = body.find("</think>", len("<think>"))
    if think_end < 0:
        return False
    think = body[len("<think>"):think_end]
    rest = body[think_end + len("</think>"):].lstrip()                 # "<answer>...</answer>"
    if not rest.startswith("<answer>") or len(rest) < len("<answer></answer>"):
        return False
    answer = rest[len("<answer>"):-len("</answer>")]
    return bool(answer.strip()) and not any(t in think or t in answer for t in _TAGS)
