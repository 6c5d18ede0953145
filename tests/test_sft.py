"""SFT: only response tokens carry loss, and the step's loss is the masked token mean; a model
with MTP depths (which post-training does not run) saves and resumes exactly."""
import random

import pytest
import torch

from distributed import run_ranks
from test_parallel_core import assert_close
from megads.checkpoint import CheckpointReader
from megads.config import ConfigError, load_config
from megads.data import prepare_data
from megads.data.synthetic import make_problem
from megads.parallel.mesh import Mesh, build_mesh
from megads.rl.policy import build_policy
from megads.rl.problems import encode_example, held_out_problems, is_held_out, problem_stream, take
from megads.rl.sft import SFTTrainer, pad_examples

SMALL = ["parallel.tp=1", "model.hidden_size=32", "model.num_layers=2", "model.intermediate_size=64",
         "model.moe_intermediate_size=16", "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
         "model.qk_rope_head_dim=4", "model.v_head_dim=8", "model.mtp_depth=0", "data.synthetic_docs=2000",
         "data.synthetic_valid_docs=100", "train.global_batch=4", "train.micro_batch=2", "train.steps=1",
         "sft.eval_problems=4", "checkpoint.resume=none"]


def test_padding_masks_prompt_and_padding():
    tokens, mask = pad_examples([([3, 10, 11, 20, 21, 3], 3), ([3, 12, 22, 3], 2)], pad_id=0)
    assert tokens.tolist() == [[3, 10, 11, 20, 21, 3], [3, 12, 22, 3, 0, 0]]
    # mask[i, j] marks target tokens[i, j + 1]: the response tokens and the closing eos
    assert mask.tolist() == [[False, False, True, True, True], [False, True, True, False, False]]


def test_held_out_problems_never_appear_in_training():
    train = {p.prompt for p in take(problem_stream("1-sft-0", [0, 1], held_out=False), 3000)}
    held = held_out_problems(1, [0, 1], 200)
    assert all(is_held_out(p) for p in held) and not train & {p.prompt for p in held}


def test_sft_step_is_the_masked_token_mean(tmp_path, data_cache):
    cfg = load_config("configs/tiny.yaml", SMALL + [f"train.run_dir={tmp_path}", f"data.cache_dir={data_cache}"]
                      ).validate(world_size=1)
    tokenizer = prepare_data(cfg.data, cfg.model.vocab_size).tokenizer
    trainer = SFTTrainer(cfg, tokenizer)
    examples = trainer.step_examples(0)
    ids, prompt_len = encode_example(tokenizer, make_problem(random.Random(3), 0))
    assert ids[0] == tokenizer.eos_id and ids[-1] == tokenizer.eos_id and tokenizer.decode(ids[prompt_len:-1]).startswith("<think>")
    tokens, mask = pad_examples(examples, tokenizer.pad_id)
    with torch.no_grad():
        logits = trainer.model.logits(trainer.model.hidden_states(tokens[:, :-1]))
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        expected = (per_token.view_as(mask) * mask).sum() / mask.sum()
    record = trainer.train_step()
    assert record["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert record["response_tokens"] == mask.sum().item()


def test_bad_sft_settings_are_refused():
    with pytest.raises(ConfigError, match="sft.tiers"):
        load_config("configs/tiny.yaml", ["sft.tiers=[5]"]).validate()
    with pytest.raises(ConfigError, match="sft.init"):
        load_config("configs/tiny.yaml", ["sft.init=/no/such/checkpoint"]).validate()
    with pytest.raises(ConfigError, match="parallel.tp=1 with expert parallelism"):
        load_config("configs/tiny.yaml", ["parallel.tp=2", "parallel.ep=2"]).validate(4).validate_generation_layout(4, 8)


def _sft_with_mtp(rank, world_size, run_dir, cache, steps):
    cfg = load_config("configs/tiny.yaml", SMALL + ["model.mtp_depth=1", "sft.eval_interval=0", "checkpoint.resume=auto", "train.eps=1e-2",
                                                    f"train.steps={steps}", f"train.run_dir={run_dir}",
                                                    f"data.cache_dir={cache}"]).validate(world_size)
    trainer = SFTTrainer(cfg, prepare_data(cfg.data, cfg.model.vocab_size).tokenizer, build_mesh(cfg.parallel))
    trainer.fit()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_model_with_mtp_saves_and_resumes_exactly(tmp_path, data_cache):
    """Post-training (SFT here, GRPO alike) runs no MTP depth: the MTP weights are frozen, saved
    unchanged and without optimizer state, under one process and under ZeRO (DP=2), and resume
    is bitwise. (A large AdamW eps makes the first steps proportional to the gradient, so that
    DP=2 agrees to fp32 rounding.)"""
    straight = _sft_with_mtp(0, 1, tmp_path / "straight", data_cache, 2)
    _sft_with_mtp(0, 1, tmp_path / "resumed", data_cache, 1)
    resumed = _sft_with_mtp(0, 1, tmp_path / "resumed", data_cache, 2)     # resumes at step 1
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)
    reader = CheckpointReader(str(tmp_path / "straight" / "checkpoints" / "step_00000002"))
    cfg = load_config("configs/tiny.yaml", SMALL + ["model.mtp_depth=1"]).validate()
    initial = build_policy(cfg, Mesh(), torch.device("cpu"), None)[0].state_dict()
    mtp = reader.names("model.mtp.")
    assert mtp and all(torch.equal(reader.read(n), initial[n.removeprefix("model.")]) for n in mtp)
    moments = reader.names("optimizer.exp_avg.")
    assert moments and not any(".mtp." in n for n in moments)
    ranks = run_ranks(_sft_with_mtp, 2, (tmp_path / "zero1", data_cache, 2), timeout=300)
    for name, value in straight.items():
        assert_close(ranks[0][name], value, name)
