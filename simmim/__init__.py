"""SimMIM pretraining and fine-tuning stages (Lightning) around the `swinv2` encoder."""

from simmim.masking import MaskGenerator
from simmim.model import SimMIM, masked_l1_loss, normalize_target

__all__ = ["MaskGenerator", "SimMIM", "masked_l1_loss", "normalize_target"]
