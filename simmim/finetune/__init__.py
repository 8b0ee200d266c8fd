"""Stage 2: fine-tuning a pretrained SwinV2 for classification, at the same or a larger window."""

from simmim.finetune.cli import FinetuneCLI, main
from simmim.finetune.data import ClassificationDataModule, LabelledImageDataset
from simmim.finetune.module import SwinV2Classifier
from simmim.optim import layer_decay_param_groups, swin_layer_id

__all__ = [
    "main",
    "FinetuneCLI",
    "ClassificationDataModule",
    "LabelledImageDataset",
    "SwinV2Classifier",
    "layer_decay_param_groups",
    "swin_layer_id",
]
