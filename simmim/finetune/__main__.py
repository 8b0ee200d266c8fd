"""`python -m simmim.finetune`: fine-tuning for classification (see `simmim.finetune.cli`)."""

from simmim.distributed import finish_distributed
from simmim.finetune.cli import main

main()
finish_distributed()
