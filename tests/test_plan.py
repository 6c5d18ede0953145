"""The parallel plan (megads/parallel/plan.py) as data, checked without running a model: over all
ranks of a layout the local parts tile every global tensor, the global norm counts each element
once, the plan's shapes are the built model's, a wrong model is refused, and `--print-plan`
prints it without starting a process."""
import subprocess
import sys

import pytest
import torch

from megads.config import load_config
from megads.parallel.builder import build_model
from megads.parallel.mesh import layout_mesh
from megads.parallel.plan import plan_layout

SMALL = ["model.num_layers=4", "train.micro_batch=1", "train.global_batch=8"]
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "dp2-ep2": (2, ["parallel.tp=1", "parallel.ep=2"]),
    "tp2-dp2-ep2": (4, ["parallel.tp=2", "parallel.ep=2"]),
    "dualpipe-pp2-tp2-ep2": (8, ["parallel.tp=2", "parallel.ep=2", "parallel.pp=2",
                                 "parallel.pipeline_schedule=dualpipe"]),
    "1f1b-pp2-uneven": (2, ["parallel.tp=1", "parallel.pp=2", "parallel.pipeline_schedule=1f1b",
                            "parallel.pipeline_layout=Et|tttLm"]),
}


def config(overrides, world_size):
    return load_config("configs/tiny.yaml", SMALL + overrides).validate(world_size)


def plans(overrides, world_size):
    cfg = config(overrides, world_size)
    return [plan_layout(cfg, layout_mesh(cfg.parallel, world_size, rank)) for rank in range(world_size)]


def part(plan, placement):
    return tuple(slice(o, o + n) for o, n in zip(plan.offset(placement), plan.local_shape(placement)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_ranks_parts_tile_every_tensor_and_the_norm_counts_each_element_once(layout):
    world_size, overrides = LAYOUTS[layout]
    every_rank = plans(overrides, world_size)
    for name, placement in every_rank[0].placements.items():
        held = torch.zeros(placement.shape, dtype=torch.int64)       # copies over the ranks holding it
        counted = torch.zeros(placement.shape, dtype=torch.int64)    # times the global norm adds it
        for plan in every_rank:
            p = plan.placements[name]
            if plan.mesh.pp_rank not in p.holders:
                continue
            held[part(plan, p)] += 1
            # dense sums run over one replica's TP x PP ranks (each DP replica has the same
            # norm); expert sums over all ranks, the EDP group spanning the replicas
            if p.parameter and plan.counts_in_norm(p) and (p.expert or plan.mesh.dp_rank == 0):
                counted[part(plan, p)] += 1
        assert held.min() >= 1, f"{name}: an element no rank holds"
        copies = len(placement.holders) * every_rank[0].mesh.dp * every_rank[0].mesh.tp
        split = (every_rank[0].mesh.tp if placement.tp_dim is not None else 1) \
            * (every_rank[0].mesh.ep if placement.expert else 1)
        assert torch.all(held == copies // split), f"{name}: parts overlap or leave gaps"
        if placement.parameter:
            assert torch.all(counted == 1), f"{name}: the norm counts an element {counted.max()} times"


def test_the_plan_declares_what_each_parallelism_changes():
    plan = plans(LAYOUTS["tp2-dp2-ep2"][1], 4)[0]
    p = plan.placements
    assert p["layers.1.self_attn.q_b_proj.weight"].tp_dim == 0 and p["layers.1.self_attn.o_proj.weight"].tp_dim == 1
    assert p["embed_tokens.weight"].tp_dim == 0 and p["lm_head.weight"].tp_dim == 0
    assert p["layers.1.mlp.experts.gate_proj"].expert and p["layers.1.mlp.experts.gate_proj"].grad_group == "edp"
    assert p["layers.1.mlp.gate.weight"].tp_grad_sum                        # routes this TP rank's slice only
    assert not p["layers.1.mlp.gate.e_score_correction_bias"].parameter
    assert not p["norm.weight"].decays and p["layers.0.mlp.up_proj.weight"].decays
    sp = plans(LAYOUTS["tp2-sp"][1], 2)[0].placements
    assert sp["norm.weight"].tp_grad_sum and not sp["lm_head.weight"].tp_grad_sum


@pytest.mark.parametrize("layout", ["tp2-sp", "tp2-dp2-ep2"])
def test_the_built_model_has_the_plans_shapes(layout):
    """(A pipeline needs process groups to build; the tiling test covers its holders.)"""
    world_size, overrides = LAYOUTS[layout]
    cfg = config(overrides, world_size)
    for rank in range(world_size):
        built = build_model(cfg, layout_mesh(cfg.parallel, world_size, rank), torch.device("meta"), initialise=False)
        for name, tensor in built.model.state_dict(keep_vars=True).items():
            assert built.plan.of(tensor).name == name
            assert tuple(tensor.shape) == built.plan.local_shape(built.plan.placements[name])


def test_a_model_the_plan_does_not_describe_is_refused():
    whole = build_model(config(["parallel.tp=1"], 1), layout_mesh(config(["parallel.tp=1"], 1).parallel, 1),
                        torch.device("meta"), initialise=False).model
    plan = plans(LAYOUTS["tp2"][1], 2)[0]
    with pytest.raises(ValueError, match=r"embed_tokens\.weight is \[512, 128\] on this rank, but the parallel plan "
                                         r"puts \[256, 128\] of its \[512, 128\] here"):
        plan.bind(whole)
    with pytest.raises(KeyError, match="not part of the model"):
        plan.of(torch.zeros(1))


def test_print_plan_starts_no_process():
    out = subprocess.run([sys.executable, "-m", "megads.pretrain", "configs/tiny.yaml", "parallel.ep=2",
                          "--print-plan", "--world-size", "4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "parallel plan: world 4 = pp 1 x dp 2 x tp 2, ep 2"
    assert lines[1].split() == ["tensor", "global", "shape", "shards", "gradient", "stages"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["layers.1-3.mlp.experts.gate_proj"] == ["8x96x128", "ep", "2", "on", "dim", "0", "sum", "edp", "/", "dp", "0"]
    assert rows["lm_head.weight"] == ["512x128", "tp", "2", "on", "dim", "0", "mean", "dp", "0"]
    assert rows["layers.1-3.mlp.gate.weight"] == ["8x128", "whole", "sum", "tp,", "mean", "dp", "0"]
    bad = subprocess.run([sys.executable, "-m", "megads.pretrain", "configs/tiny.yaml", "--print-plan",
                          "--world-size", "3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "world size 3 is not divisible by parallel.tp" in bad.stderr
    no_config = subprocess.run([sys.executable, "-m", "megads.pretrain", "--print-plan"], capture_output=True,
                               text=True, timeout=120)
    assert no_config.returncode == 2 and no_config.stderr.count("\n") == 1
    assert "--print-plan needs the config first" in no_config.stderr
