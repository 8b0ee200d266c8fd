"""Pure-PyTorch Swin Transformer V2 encoder (no Lightning here)."""

from swinv2.checkpoint import LoadReport, load_pretrained, to_timm_state_dict, transformers_config_kwargs
from swinv2.model import VARIANTS, SwinTransformerV2, create_model

__all__ = [
    "SwinTransformerV2",
    "create_model",
    "VARIANTS",
    "load_pretrained",
    "to_timm_state_dict",
    "LoadReport",
    "transformers_config_kwargs",
]
