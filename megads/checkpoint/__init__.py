"""Layout-free checkpoints (see docs/checkpoint.md) and the HuggingFace DeepseekV3 mapping."""
from megads.checkpoint.format import CheckpointError, CheckpointReader
from megads.checkpoint.sharded import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint

__all__ = ["CheckpointError", "CheckpointReader", "latest_checkpoint", "load_checkpoint", "load_model_weights",
           "save_checkpoint"]
