"""SimMIM pretraining and fine-tuning stages (Lightning) around the `swinv2` encoder.

Shared modules live here (`images`, `loaders`, `optim`, `cli`, `export`, `bad_images`, `builtin_data`); each stage
is a subpackage (`simmim.pretrain`, `simmim.finetune`) that imports the shared modules and never the other stage.
"""

from simmim.finetune import ClassificationDataModule, SwinV2Classifier
from simmim.pretrain import (
    MaskGenerator,
    PretrainDataModule,
    SimMIM,
    SimMIMPretrainer,
    masked_l1_loss,
    normalize_target,
)

__all__ = [
    "MaskGenerator",
    "SimMIM",
    "masked_l1_loss",
    "normalize_target",
    "SimMIMPretrainer",
    "PretrainDataModule",
    "SwinV2Classifier",
    "ClassificationDataModule",
]
