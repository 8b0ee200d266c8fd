"""`python -m simmim.pretrain`: SimMIM pretraining (see `simmim.pretrain.cli`)."""

from simmim.distributed import finish_distributed
from simmim.pretrain.cli import main

main()
finish_distributed()
