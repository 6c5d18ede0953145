"""Rule-based rewards on good, wrong, malformed and adversarial text; the overlong penalty;
plug-in reward functions by dotted path; RewardSet totals and per-function values."""
from __future__ import annotations

import random

import pytest
import torch

from megads.config import ConfigError
from megads.data import make_problem
from megads.rl import RewardSet, accuracy_reward, format_reward, length_penalty, load_reward_fn

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
    with pytest.raises(ValueError, match="non-finite"):
        RewardSet([f"{__name__}:nan_reward"])(["q"], [GOOD], ["92"])


def nan_reward(prompt: str, response: str, answer: str) -> float:
    return float("nan")
