"""GRPO post-training: the model-free core (advantages, KL, clipped loss, rewards)."""
from megads.rl.loss import dynamic_sampling_mask, group_advantages, kl_penalty, policy_loss, token_entropy
from megads.rl.rewards import (
    RewardSet,
    accuracy_reward,
    format_reward,
    length_penalty,
    load_reward_fn,
    parse_number,
)

__all__ = [
    "RewardSet",
    "accuracy_reward",
    "dynamic_sampling_mask",
    "format_reward",
    "group_advantages",
    "kl_penalty",
    "length_penalty",
    "load_reward_fn",
    "parse_number",
    "policy_loss",
    "token_entropy",
]
