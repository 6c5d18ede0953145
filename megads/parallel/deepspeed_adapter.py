"""Where megads reaches past DeepSpeed's public API: in this one module, each place with why.

megads builds its own process groups (parallel/mesh.py) and its own MoE layer; DeepSpeed's ZeRO
offers no public way to be told about either, nor to relink its optimizer-state fragments:

1. `register_expert_groups`: ZeRO reduces and partitions an expert parameter over the group
   registered under the parameter's `group_name` in `deepspeed.utils.groups`' private dicts;
   its public initialisers build their own groups from an ep size, not megads' mesh.
2. `megads_moe_recognised`: the engine switches its MoE handling on when it finds an instance of
   the name `MoE` in `deepspeed.runtime.engine`; megads' layer stands in for it while the
   engine is built (an explicit swap of that one name, restored after).
3. `link_optimizer_fragments`: the fragment API (`safe_get/set_full_optimizer_state`) is
   linked once, after the first step of the first parameter group; the checkpoint code relinks
   it so that every group's fragments are valid.
4. `quiet_deepspeed`: its accelerator notice, its deprecated-collective FutureWarning and a bare
   print of its CPU comm build, none of them news to a megads user.
5. `describe_placement`: ZeRO's gradient norm learns a parameter's placement only from attributes
   on the tensor (`model_parallel`: a distinct shard on every TP rank; `ds_pipe_replicated`: a
   pipeline copy counted elsewhere); megads writes them from its parallel plan, never reads them.

tests/test_deepspeed_adapter.py fails by name when an installed DeepSpeed moves any of these.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from megads.parallel.mesh import Mesh
from megads.parallel.plan import ParallelPlan


def quiet_deepspeed(device: torch.device) -> None:
    """Keep DeepSpeed from printing what is not news to a megads user; call before DeepSpeed is imported."""
    if device.type == "cpu":
        # DeepSpeed picks its accelerator when first imported and, finding no GPU, warns once per
        # rank that it fell back to the CPU; megads trains on the CPU here, so it says so.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # ZeRO-1/2 all-gather the updated partitions with torch.distributed.all_gather_into_tensor
    # (deepspeed.comm's TorchBackend.all_gather_function, DeepSpeed 0.19), which torch 2.13
    # deprecates with a FutureWarning per rank. megads itself calls the new name (parallel/tensor.py).
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def describe_placement(model: nn.Module, plan: ParallelPlan) -> None:
    """Tell ZeRO's norm what megads' plan says: TP shards are distinct on every TP rank (counted by
    each, not by TP rank 0 alone), and pipeline copies whose home is another rank are not counted."""
    for p in model.parameters():
        if plan.of(p).tp_dim is not None:
            p.model_parallel = True
        if plan.is_mirror(p):
            p.ds_pipe_replicated = True


def register_expert_groups(experts: list[nn.Parameter], optimizer: torch.optim.Optimizer, mesh: Mesh) -> None:
    """Hand megads' expert parallelism to DeepSpeed's MoE bookkeeping.

    DeepSpeed's ZeRO reduces and partitions a parameter over its expert-data-parallel group when
    the parameter has `allreduce=False` and a `group_name` registered in `deepspeed.utils.groups`,
    and the optimizer group holding it is marked `moe`. Its gradient is divided by dp before the
    sum over that group: exactly megads' expert gradient (sum over EDP / dp). `model_parallel`
    makes every TP rank count its expert shards in the global norm (they are distinct experts).
    """
    from deepspeed.utils import groups
    name = f"ep_size_{mesh.ep}"
    groups._EXPERT_PARALLEL_GROUP[name] = mesh.process_group("ep")
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = mesh.ranks["ep"]
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = mesh.process_group("edp")
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = mesh.ranks["edp"]
    for p in experts:
        p.allreduce, p.group_name, p.model_parallel = False, name, True
    for group in optimizer.param_groups:
        if group.get("expert"):
            group.update(moe=True, name=name)


@contextlib.contextmanager
def megads_moe_recognised(moe_class: type | None) -> Iterator[None]:
    """While DeepSpeed builds its engine: megads' MoE layer counts as DeepSpeed's own (None: no
    experts, nothing to change); DeepSpeed's bare prints of its CPU comm build are dropped (its
    logger keeps the real stdout, so its warnings still show)."""
    from deepspeed.runtime import engine
    original = engine.MoE
    if moe_class is not None:
        engine.MoE = (original, moe_class)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        engine.MoE = original


def link_optimizer_fragments(zero) -> None:
    """Point every parameter's fragment at the current AdamW state of its flat partition.
    DeepSpeed links them once, after the first step of the first parameter group, when the
    other groups have no state yet; relinking makes the fragments of every group valid."""
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
