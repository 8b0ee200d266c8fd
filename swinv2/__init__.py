"""Pure-PyTorch Swin Transformer V2 encoder (no Lightning here)."""

from swinv2.checkpoint import (
    LoadReport,
    adapt_in_chans,
    add_record,
    architecture,
    checkpoint_windows,
    create_model_from_checkpoint,
    load_pretrained,
    read_inputs,
    read_labels,
    save_weights,
)
from swinv2.convert import CheckpointMismatchError, to_timm_state_dict, transformers_config_kwargs
from swinv2.model import VARIANTS, SwinTransformerV2, create_model
from swinv2.reading import UnsafeCheckpointError, read_checkpoint

__all__ = [
    "SwinTransformerV2",
    "create_model",
    "VARIANTS",
    "load_pretrained",
    "adapt_in_chans",
    "create_model_from_checkpoint",
    "save_weights",
    "architecture",
    "add_record",
    "checkpoint_windows",
    "read_inputs",
    "read_labels",
    "read_checkpoint",
    "to_timm_state_dict",
    "LoadReport",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "transformers_config_kwargs",
]
