"""Stage 1: SimMIM pretraining of a SwinV2 encoder (masking, decoder and loss, data, LightningModule, CLI)."""

from simmim.pretrain.cli import PretrainCLI, main
from simmim.pretrain.data import MaskedImageDataset, PretrainDataModule
from simmim.pretrain.masking import MaskGenerator
from simmim.pretrain.model import SimMIM, masked_l1_loss, normalize_target
from simmim.pretrain.module import SimMIMPretrainer

__all__ = [
    "main",
    "PretrainCLI",
    "PretrainDataModule",
    "MaskedImageDataset",
    "MaskGenerator",
    "SimMIM",
    "SimMIMPretrainer",
    "masked_l1_loss",
    "normalize_target",
]
