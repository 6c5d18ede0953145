"""Rule-based rewards on good, wrong, malformed and adversarial text; the overlong penalty;
plug-in reward functions by dotted path; RewardSet totals and per-function values; bad plug-in
values refused in one line; the tag parser linear-time and equal to its regex definition."""
from __future__ import annotations

import random
import re
import sys
import time
from decimal import Decimal

import pytest
import torch

from megads.config import ConfigError
from megads.data import make_problem
from megads.data.synthetic import extract_answer, format_ok
from megads.rl import RewardSet, accuracy_reward, format_reward, length_penalty, load_reward_fn
from megads.rl.rewards import RewardError

GOOD = "<think>25 * 3 = 75. 17 + 75 = 92.</think><answer>92</answer>"


def tiny_reward(prompt: str, response: str, answer: str) -> float:
    """A plug-in loaded by dotted path below: 0.5 per occurrence of the answer in the response."""
    return 0.5 * response.count(answer)


NOT_A_FUNCTION = 3


@pytest.mark.parametrize("response, expected", [
    (GOOD, 1.0),
    ("<think>x</think><answer> 92 </answer>", 1.0),
    ("<think>x</think><answer>92.0</answer>", 1.0),
    ("<think>x</think><answer>+92.00</answer>", 1.0),
    ("<answer>92</answer>", 1.0),                                  # accuracy ignores the format
    ("<think>x</think><answer>93</answer>", 0.0),                 # wrong
    ("<think>x</think><answer>92.5</answer>", 0.0),
    ("<think>x</think><answer>-92</answer>", 0.0),
    ("", 0.0),                                                     # empty
    ("92", 0.0),                                                   # no tags
    ("<think>92</think>", 0.0),
    ("<answer>92", 0.0),                                           # unclosed
    ("<answer></answer>", 0.0),                                    # empty answer
    ("<answer>   </answer>", 0.0),
    ("<answer>ninety-two</answer>", 0.0),                          # unparseable
    ("<answer>92 apples</answer>", 0.0),
    ("<answer>9.2e1</answer>", 0.0),                               # no exponent notation
    ("<answer>inf</answer>", 0.0),
    ("<answer>nan</answer>", 0.0),
    ("<answer>0x5c</answer>", 0.0),
    ("<answer>٩٢</answer>", 0.0),                                  # non-ASCII digits
    ("<answer>92</answer><answer>93</answer>", 0.0),               # hedging over candidates
    ("<answer>93</answer><answer>92</answer>", 0.0),
    ("<answer>92</answer><answer>92</answer>", 0.0),
    ("<answer><answer>92</answer></answer>", 0.0),                 # nested
    ("<think><answer>92</answer></think>", 1.0),                   # one answer block, misplaced
    ("<answer>" + "9" * 5000 + "</answer>", 0.0),                 # huge number
    ("<answer>92" + "0" * 400 + "</answer>", 0.0),
    ("<answer>92." + "0" * 400 + "</answer>", 1.0),
])
def test_accuracy_reward(response, expected):
    assert accuracy_reward(response, "92") == expected


def test_accuracy_reward_huge_and_unusual_gold():
    big = "9" * 5000
    assert accuracy_reward(f"<answer>{big}</answer>", big) == 1.0
    assert accuracy_reward(f"<answer>{big}8</answer>", big) == 0.0
    assert accuracy_reward("<answer>0</answer>", "0") == 1.0
    assert accuracy_reward("<answer>-0</answer>", "0") == 1.0
    with pytest.raises(ValueError, match="gold answer 'ninety' is not a number"):
        accuracy_reward("<answer>90</answer>", "ninety")


def test_accuracy_and_format_on_generated_problems():
    rng = random.Random(3)
    for tier in range(4):
        p = make_problem(rng, tier)
        assert accuracy_reward(p.response, p.answer) == 1.0 and format_reward(p.response) == 1.0
        assert accuracy_reward(p.response, str(int(p.answer) + 1)) == 0.0


@pytest.mark.parametrize("response, expected", [
    (GOOD, 1.0),
    ("  <think>a</think>\n<answer>1</answer>\n", 1.0),             # outer whitespace allowed
    ("<think></think><answer>1</answer>", 1.0),
    ("", 0.0),
    ("<answer>92</answer>", 0.0),                                  # no think
    ("<think>a</think>", 0.0),                                     # no answer
    ("<think>a</think><answer></answer>", 0.0),                    # empty answer
    ("<answer>1</answer><think>a</think>", 0.0),                   # wrong order
    ("<think>a</think><answer>1</answer>trailing", 0.0),
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),
    ("<think><think>a</think></think><answer>1</answer>", 0.0),    # nested
    ("<think>a<answer>1</answer></think><answer>1</answer>", 0.0),
    ("<think>a</think><answer>1", 0.0),                            # unclosed
])
def test_format_reward(response, expected):
    assert format_reward(response) == expected


def test_length_penalty_dapo_overlong():
    # max_len 100, cache 20: 0 up to 80, then (80 - len) / 20, -1 beyond 100
    assert [length_penalty(n, 100, 20) for n in (0, 80, 81, 90, 100, 101, 500)] == \
        [0.0, 0.0, -0.05, -0.5, -1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="cache_len"):
        length_penalty(10, 100, 0)


def test_load_reward_fn_by_dotted_path():
    for path in (f"{__name__}:tiny_reward", f"{__name__}.tiny_reward"):
        fn = load_reward_fn(path)
        assert fn("q", "92 and 92", "92") == 1.0


@pytest.mark.parametrize("path, words", [
    ("no_such_module_xyz:fn", ["grpo.reward_fns='no_such_module_xyz:fn'", "cannot be imported", "package.module:function"]),
    (f"{__name__}:missing", ["grpo.reward_fns=", "cannot be imported", "missing"]),
    (f"{__name__}:NOT_A_FUNCTION", ["is a int, not a function"]),
    ("justaname", ["not a dotted path"]),
    (":fn", ["not a dotted path"]),
])
def test_load_reward_fn_errors(path, words):
    with pytest.raises(ConfigError) as err:
        load_reward_fn(path, setting="grpo.reward_fns")
    for word in words:
        assert word in str(err.value)


def test_reward_set_totals_and_per_function_values():
    plug = f"{__name__}:tiny_reward"
    rewards = RewardSet(["accuracy", "format", plug], weights=[1.0, 0.5, 2.0], overlong=(10, 4))
    responses = [GOOD, "<answer>92</answer>", "<think>x</think><answer>7</answer>"]
    total, per_fn = rewards(["q"] * 3, responses, ["92", "92", "92"], response_lens=[5, 8, 12])
    torch.testing.assert_close(per_fn["accuracy"], torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(per_fn["format"], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(per_fn[plug], torch.tensor([1.0, 0.5, 0.0]))      # "92" twice, once, never
    torch.testing.assert_close(per_fn["overlong"], torch.tensor([0.0, -0.5, -1.0]))
    # 1 + 0.5 + 2 + 0 | 1 + 0 + 1 - 0.5 | 0 + 0.5 + 0 - 1
    torch.testing.assert_close(total, torch.tensor([3.5, 1.5, -0.5]))


def test_reward_set_errors():
    with pytest.raises(ConfigError, match="one weight per reward"):
        RewardSet(["accuracy", "format"], weights=[1.0])
    with pytest.raises(ConfigError, match="grpo.rewards='nope'"):
        RewardSet(["nope"], setting="grpo.rewards")
    with pytest.raises(ValueError, match="response_lens"):
        RewardSet(["format"], overlong=(10, 4))(["q"], [GOOD], ["92"])
    with pytest.raises(RewardError, match="must return a finite float"):
        RewardSet([f"{__name__}:nan_reward"])(["q"], [GOOD], ["92"])


def nan_reward(prompt: str, response: str, answer: str) -> float:
    return float("nan")


BAD_VALUE: object = None


def second_is_bad(prompt: str, response: str, answer: str) -> object:
    """A plug-in returning BAD_VALUE for the response "second" and 1.0 otherwise."""
    return BAD_VALUE if response == "second" else 1.0


def score_with(monkeypatch, value: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    monkeypatch.setattr(sys.modules[__name__], "BAD_VALUE", value)
    rewards = RewardSet([f"{__name__}:second_is_bad"], setting="grpo.rewards")
    return rewards(["Question: 1 + 1 = ?\n", "Question: 2 + 5 = ?\n"], ["first", "second"], ["2", "7"])


@pytest.mark.parametrize("value", [None, "1.0", b"1", [1.0], {"r": 1.0}, torch.tensor([1.0, 2.0]), 10 ** 400,
                                   1e300, -1e39, float("inf"), float("-inf"), float("nan")],
                         ids=lambda v: type(v).__name__ + ":" + repr(v)[:12])
def test_bad_reward_values_are_refused_naming_the_reward_and_response(monkeypatch, value):
    """1e300 and -1e39 are finite floats but inf in float32, where one inf makes every advantage NaN;
    None or a string is a bug in the plug-in. Each is one line naming the setting entry, the value,
    the response and its prompt."""
    with pytest.raises(RewardError) as err:
        score_with(monkeypatch, value)
    message = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in message
    assert f"grpo.rewards entry '{__name__}:second_is_bad' returned " in message
    assert "for response 1 (prompt 'Question: 2 + 5 = ?\\n')" in message
    assert "a reward function must return a finite float" in message
    assert repr(value).replace("\n", " ")[:40] in message


@pytest.mark.parametrize("value, expected", [(2, 2.0), (True, 1.0), (Decimal("0.5"), 0.5), (torch.tensor(0.25), 0.25),
                                             (3.0e38, 3.0e38), (-0.0, 0.0)])
def test_numbers_of_any_type_within_float32_are_accepted(monkeypatch, value, expected):
    total, per_fn = score_with(monkeypatch, value)
    torch.testing.assert_close(total, torch.tensor([1.0, expected]))


# ----------------------------------------------------------------------------- the tag parser

def test_tag_floods_are_judged_in_linear_time():
    """A reward runs on every rank between two collectives: a slow one stalls them all. The old
    backtracking regexes took 2 s on 4000 repeats of the third flood (and grew quadratically)."""
    for n in (4000, 40000):
        floods = ["<answer>" * n, "<think>" + "</think><answer>" * n, "<think>" + "</think> <answer>1</answer>" * n + "x",
                  "<think>" * n + "</think><answer>1</answer>", "<think>a</think><answer>" + "</answer>" * n]
        start = time.perf_counter()
        judged = [(format_ok(t), extract_answer(t), accuracy_reward(t, "1")) for t in floods]
        elapsed = time.perf_counter() - start
        assert elapsed < 0.25, f"{n} repeated tags took {elapsed:.2f} s"
        assert [j[0] for j in judged] == [False] * 5
        assert [j[1] for j in judged] == [None, None, "1", "1", None]


OLD_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
OLD_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.S)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def reference_extract_answer(text: str) -> str | None:
    """The regex definition the linear parser must reproduce (backtracking: short strings only)."""
    m = OLD_ANSWER_RE.search(text)
    return m.group(1).strip() or None if m else None


def reference_format_ok(text: str) -> bool:
    m = OLD_FORMAT_RE.fullmatch(text)
    return m is not None and bool(m.group(2).strip()) and not any(t in g for t in TAGS for g in m.groups())


WHITESPACE = (" ", "\n", "\t", "\xa0", "\x1c", "\u2028")
CONTENT = ("1", "92", "x", "<", ">", "/", "<answer", "/think>", " ")
TAG_PIECES = ("<think>", "</think>", "<answer>", "</answer>")


def random_text(rng: random.Random) -> str:
    """A well-formed skeleton (whitespace outside the blocks, content inside) with, now and then,
    a piece of anything anywhere and a tag dropped or doubled: both verdicts come out often."""
    slots = (WHITESPACE, CONTENT, WHITESPACE, CONTENT, WHITESPACE)
    parts = []
    for pieces, tag in zip(slots, TAG_PIECES + ("",)):
        parts += rng.choices(pieces, k=rng.choice((0, 1, 1, 2)))
        if rng.random() < 0.08:
            parts.append(rng.choice(WHITESPACE + CONTENT + TAG_PIECES))
        parts.append(rng.choice(("", tag + tag)) if rng.random() < 0.04 else tag)
    return "".join(parts)


def test_parser_equals_the_regex_definition_on_random_text():
    rng = random.Random(0)
    verdicts = []
    for _ in range(20000):
        text = random_text(rng)
        assert format_ok(text) == reference_format_ok(text), repr(text)
        assert extract_answer(text) == reference_extract_answer(text), repr(text)
        verdicts.append(format_ok(text))
    assert 2000 < sum(verdicts) < 18000                                   # both verdicts well covered
