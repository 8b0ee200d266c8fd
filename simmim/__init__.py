"""SimMIM pretraining and fine-tuning (Lightning) around the `swinv2` encoder.

The stages are subpackages (`simmim.pretrain`, `simmim.finetune`, and the evaluation tools in `simmim.eval`) that
never import each other; what they share is a few concepts at the top: `data` (reading images), `checkpointing`
(run folders, exports, untrusted files), `seeding`, `distributed`, `optim`, `stage` (the LightningModule base),
`monitors`, `cli` and `errors` (docs/layout.md draws who may import whom).

The classes below are re-exported here, once, and lazily, so importing one stage never loads the other.
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
