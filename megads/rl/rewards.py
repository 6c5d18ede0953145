"""Rule-based rewards on decoded responses, plug-in reward functions, and their weighted sum.

A reward function has the signature (prompt: str, response: str, answer: str) -> float.
Anything that cannot be parsed scores 0.0, never the maximum.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from decimal import Decimal

import torch

from megads.config import ConfigError
from megads.data.synthetic import extract_answer, format_ok

RewardFn = Callable[[str, str, str], float]


class RewardError(ConfigError):
    """A reward function returned something other than a finite float: a bug in the function named
    by the setting, reported as one line like any bad setting."""

_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")   # plain ASCII decimal: no exponent, inf, nan


def parse_number(text: str) -> Decimal | None:
    """Exact value of a plain decimal number ("92", " 92 ", "92.0", "-3", ".5"); None otherwise."""
    text = text.strip()
    return Decimal(text) if _NUMBER_RE.fullmatch(text) else None


def accuracy_reward(response: str, answer: str) -> float:
    """1.0 iff the response has exactly one <answer>...</answer> and its content is the same number
    as the gold `answer` (compared exactly, so "92.0" == "92"); 0.0 otherwise. Several answer
    blocks score 0 so that hedging over candidates is never rewarded."""
    gold = parse_number(answer)
    if gold is None:
        raise ValueError(f"gold answer {answer!r} is not a number; accuracy_reward compares numbers")
    if response.count("<answer>") != 1 or response.count("</answer>") != 1:
        return 0.0
    content = extract_answer(response)
    value = None if content is None else parse_number(content)
    return float(value is not None and value == gold)


def format_reward(response: str) -> float:
    """1.0 iff the response is exactly "<think>...</think><answer>...</answer>" (outer whitespace
    allowed, no nested or repeated tags, non-empty answer); 0.0 otherwise."""
    return float(format_ok(response))


def length_penalty(response_len: int, max_len: int, cache_len: int) -> float:
    """DAPO overlong soft punishment (arXiv 2503.14476, eq. 13), on token counts:
    0 for len <= max_len - cache_len; (max_len - cache_len - len) / cache_len, falling linearly to
    -1, for max_len - cache_len < len <= max_len; -1 beyond max_len."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    soft_start = max_len - cache_len
    if response_len <= soft_start:
        return 0.0
    if response_len <= max_len:
        return (soft_start - response_len) / cache_len
    return -1.0


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "accuracy": lambda prompt, response, answer: accuracy_reward(response, answer),
    "format": lambda prompt, response, answer: format_reward(response),
}


def load_reward_fn(path: str, setting: str = "reward function") -> RewardFn:
    """Resolve "package.module:function" (or "package.module.function") to a callable. Errors are
    ConfigErrors naming `setting`, the config key the path came from."""
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not (module_name and sep and attr):
        raise ConfigError(f"{setting}={path!r} is not a dotted path; write 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{setting}={path!r} cannot be imported ({exc}); give 'package.module:function' "
                          "importable on PYTHONPATH, with signature (prompt, response, answer) -> float") from exc
    if not callable(fn):
        raise ConfigError(f"{setting}={path!r} is a {type(fn).__name__}, not a function")
    return fn


class RewardSet:
    """Weighted sum of named reward functions, optionally plus the DAPO overlong penalty.

    specs: built-in names ("accuracy", "format") or dotted paths of plug-ins; they also name the
    per-function values for metrics. weights: one per spec (default 1.0 each).
    overlong: (max_len, cache_len) adds length_penalty, weight 1, reported as "overlong".
    """

    def __init__(self, specs: Sequence[str], weights: Sequence[float] | None = None,
                 overlong: tuple[int, int] | None = None, setting: str = "rewards"):
        weights = [1.0] * len(specs) if weights is None else list(weights)
        if not specs or len(weights) != len(specs):
            raise ConfigError(f"{setting}: need at least one reward and one weight per reward, "
                              f"got {len(specs)} rewards and {len(weights)} weights")
        self.fns = {s: BUILTIN_REWARDS.get(s) or load_reward_fn(s, setting) for s in specs}
        self.weights = dict(zip(specs, weights))
        self.overlong = overlong
        self.setting = setting

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str],
                 response_lens: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (total [n] fp32, {name: values [n] fp32}); `response_lens` (tokens) is needed
        with `overlong`. A reward function returning anything but a finite float32 number raises
        RewardError."""
        per_fn = {}
        for name, fn in self.fns.items():
            raw = [fn(p, r, a) for p, r, a in zip(prompts, responses, answers, strict=True)]
            per_fn[name] = self._checked(name, raw, prompts)
        total = sum(self.weights[name] * v for name, v in per_fn.items())
        if self.overlong is not None:
            if response_lens is None:
                raise ValueError("RewardSet with overlong needs response_lens (token counts)")
            per_fn["overlong"] = torch.tensor([length_penalty(n, *self.overlong) for n in response_lens],
                                              dtype=torch.float32)
            total = total + per_fn["overlong"]
        return total, per_fn

    def _checked(self, name: str, raw: list, prompts: Sequence[str]) -> torch.Tensor:
        """raw values of reward `name` -> [n] fp32. Checked after the conversion, since a float such
        as 1e300 is finite in Python but inf in float32, and one inf makes every advantage NaN."""
        numbers = [_as_float(v) for v in raw]
        if None in numbers:
            raise self._error(name, raw, numbers.index(None), prompts)
        values = torch.tensor(numbers, dtype=torch.float32)                     # [n]
        nonfinite = (~values.isfinite()).nonzero()
        if len(nonfinite):
            raise self._error(name, raw, int(nonfinite[0]), prompts)
        return values

    def _error(self, name: str, raw: list, index: int, prompts: Sequence[str]) -> RewardError:
        return RewardError(f"{self.setting} entry {name!r} returned {_short(raw[index])} for response {index} "
                           f"(prompt {_short(prompts[index])}); a reward function must return a finite float "
                           f"(|value| <= {torch.finfo(torch.float32).max:.4g}, the float32 range)")


def _as_float(value: object) -> float | None:
    """A reward's value as a Python float; None for what is not a number (None, strings, lists, ...)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError, RuntimeError):     # e.g. 10**400, a tensor of several values
        return None


def _short(value: object, limit: int = 80) -> str:
    """One-line repr of at most `limit` characters: messages quote prompts and arbitrary return values."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."
