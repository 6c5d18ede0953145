"""What megads' DeepSpeed adapter (megads/parallel/deepspeed_adapter.py) relies on beyond
DeepSpeed's public API. Each test names the private piece; if an upgrade of DeepSpeed moves it,
this file fails here, by name, rather than a parity test failing somewhere later."""
import inspect

import torch

from megads.model.moe import MoE


def test_expert_groups_are_private_dicts_of_deepspeed_utils_groups():
    from deepspeed.utils import groups
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS"):
        assert isinstance(getattr(groups, name), dict), name


def test_engine_recognises_moe_layers_by_the_name_moe_in_its_module():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from deepspeed.runtime import engine
    from megads.parallel.deepspeed_adapter import megads_moe_recognised
    assert engine.MoE is DeepSpeedMoE
    assert "isinstance(module, MoE)" in inspect.getsource(engine.DeepSpeedEngine)
    with megads_moe_recognised(MoE):
        assert issubclass(MoE, engine.MoE) if isinstance(engine.MoE, type) else MoE in engine.MoE
    assert engine.MoE is DeepSpeedMoE                                   # restored
    with megads_moe_recognised(None):
        assert engine.MoE is DeepSpeedMoE


def test_zero_optimizer_fragments_can_be_relinked():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state
    assert callable(safe_get_full_optimizer_state) and callable(safe_set_full_optimizer_state)
    assert callable(DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state)
    assert "_hp_optimizer_states_linked" in inspect.getsource(DeepSpeedZeroOptimizer)
    assert callable(DeepSpeedZeroOptimizer.refresh_fp32_params)


def test_the_deprecated_collective_deepspeed_calls_is_the_one_filtered():
    """quiet_deepspeed filters the FutureWarning of the collective deepspeed.comm still calls."""
    import importlib
    torch_backend = importlib.import_module("deepspeed.comm.torch")      # the package also binds `torch`
    assert "all_gather_into_tensor" in inspect.getsource(torch_backend.TorchBackend)
    assert hasattr(torch.distributed, "all_gather_into_tensor")


def test_zero_reads_placement_from_the_attributes_megads_writes():
    """ZeRO's gradient norm counts a parameter on every TP rank when `model_parallel` is set and
    skips it when `ds_pipe_replicated` is (deepspeed.runtime.utils, zero/stage_1_and_2)."""
    from deepspeed.runtime import utils
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    p = torch.nn.Parameter(torch.zeros(2))
    assert not utils.is_model_parallel_parameter(p)
    p.model_parallel = True
    assert utils.is_model_parallel_parameter(p)
    assert PIPE_REPLICATED == "ds_pipe_replicated"
    assert "ds_pipe_replicated" in inspect.getsource(DeepSpeedZeroOptimizer)
