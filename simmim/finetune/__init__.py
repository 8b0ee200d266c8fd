"""Stage 2: fine-tuning a pretrained SwinV2 for classification, at the same or a larger window: `augment` (the
official recipe's augmentation), `data`, `module` (the LightningModule), `callbacks` (predictions CSV) and `cli`.

`main(args)` is the command line (`python -m simmim.finetune`), callable from Python with a list of arguments.
"""

from simmim.finetune.cli import main

__all__ = ["main"]
