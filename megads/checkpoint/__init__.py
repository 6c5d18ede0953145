"""Layout-free checkpoints (see docs/checkpoint.md) and the HuggingFace DeepseekV3 mapping."""
from megads.checkpoint.format import CheckpointError, CheckpointReader
from megads.checkpoint.sharded import check_checkpoint_space, latest_checkpoint, load_checkpoint, load_model_weights, \
    save_checkpoint

__all__ = ["CheckpointError", "CheckpointReader", "check_checkpoint_space", "latest_checkpoint", "load_checkpoint",
           "load_model_weights", "save_checkpoint"]
