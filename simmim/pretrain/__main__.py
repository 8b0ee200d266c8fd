"""`python -m simmim.pretrain`: SimMIM pretraining (see `simmim.pretrain.cli`)."""

from simmim.cli import finish_distributed
from simmim.pretrain.cli import main

main()
finish_distributed()
