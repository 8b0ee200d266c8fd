"""`python -m simmim.finetune`: fine-tuning for classification (see `simmim.finetune.cli`)."""

from simmim.cli import finish_distributed
from simmim.finetune.cli import main

main()
finish_distributed()
