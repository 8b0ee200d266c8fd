"""SimMIM pretraining and fine-tuning stages (Lightning) around the `swinv2` encoder.

Shared modules live here (`images`, `loaders`, `optim`, `cli`, `export`, `bad_images`, `builtin_data`, `seeding`,
`runs`, `errors`); each stage is a subpackage (`simmim.pretrain`, `simmim.finetune`) that imports the shared
modules and never the other stage.
The names below are re-exported lazily, so importing one stage never loads the other.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MaskGenerator": "simmim.pretrain.masking",
    "SimMIM": "simmim.pretrain.model",
    "masked_l1_loss": "simmim.pretrain.model",
    "normalize_target": "simmim.pretrain.model",
    "SimMIMPretrainer": "simmim.pretrain.module",
    "PretrainDataModule": "simmim.pretrain.data",
    "SwinV2Classifier": "simmim.finetune.module",
    "ClassificationDataModule": "simmim.finetune.data",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'simmim' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list:
    return sorted([*globals(), *_EXPORTS])
