"""Training across processes: Lightning's data-parallel strategies by name (`--trainer.strategy NAME`), their
collective timeouts (`strategy_with_timeout`), gathering sharded weights, and the process group's end.

The names this module registers with Lightning (at import):

- `zero1`: DDP with the AdamW states sharded across ranks (ZeRO stage 1, as the SwinV2 paper trains SwinV2-G):
  `torch.distributed.optim.ZeroRedundancyOptimizer`. Weights and gradients stay replicated; checkpoints gather
  the optimizer states on rank 0 into one file. DDP's gradient buckets double as the gradients
  (`gradient_as_bucket_view`), saving a copy of them. Runs on CPU (gloo) and GPU (NCCL).
- `fsdp2`: FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's `ModelParallelStrategy`: weights,
  gradients and optimizer states sharded, each SwinV2 block its own unit, gathered for its forward and backward
  and freed after. Checkpoints are folders of per-rank shards (torch.distributed.checkpoint). CPU and GPU.
- `fsdp2_no_reshard`: as `fsdp2`, but a block's gathered weights stay until its backward (ZeRO stage 2: less
  communication, more memory).
- `fsdp`: the same as `fsdp2`. Lightning's own `fsdp` (FSDP1) flattens the parameters, which breaks the recipes'
  weight decay by parameter shape, refuses norm gradient clipping (every recipe clips at 5.0) and would need its
  own state-dict gathering for the exports; FSDP2 keeps every parameter's shape and name, and runs on CPU too.

Activation checkpointing (`--model.use_checkpoint true`) and sequential attention
(`--model.encoder_kwargs '{"attn_chunk_size": 1}'`) combine with every one of them.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, Iterable, Sequence

import torch
import torch.nn as nn
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry

from simmim.checkpointing.untrusted import check_sharded_checkpoint
from simmim.errors import ConfigError
from swinv2.blocks import SwinTransformerBlock

SHARDED_UNITS = (SwinTransformerBlock,)


class ZeroOneStrategy(DDPStrategy):
    """DDP whose optimizer keeps only this rank's share of the AdamW states (ZeRO-1). The modules of this project
    build `ZeroRedundancyOptimizer` when `shards_optimizer_state` is set (`simmim.optim.configure_adamw`); a
    module that builds another optimizer is refused at setup rather than silently left unsharded."""

    strategy_name = "zero1"
    shards_optimizer_state = True

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("gradient_as_bucket_view", True)  # DDP's buckets are the gradients: no second copy
        super().__init__(**kwargs)

    def setup_optimizers(self, trainer) -> None:
        super().setup_optimizers(trainer)
        from torch.distributed.optim import ZeroRedundancyOptimizer

        for opt in self.optimizers:
            inner = getattr(opt, "_optimizer", opt)
            if not isinstance(inner, ZeroRedundancyOptimizer):
                raise ConfigError(
                    f"--trainer.strategy zero1 shards a ZeroRedundancyOptimizer, but configure_optimizers returned "
                    f"{type(inner).__name__}: build it with simmim.optim.configure_adamw, or use --trainer.strategy "
                    "fsdp2, which shards any optimizer"
                )


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all processes: every SwinV2 block, then the whole model, `fully_shard`ed in the
    module's `configure_model` (`simmim.stage.StageModule`). `reshard_after_forward=False` keeps each block's
    gathered weights from its forward to its backward (ZeRO-2)."""

    strategy_name = "fsdp2"

    def __init__(self, reshard_after_forward: bool = True, **kwargs) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # Lightning's "auto" is the node count
        super().setup_environment()

    def shard(self, module: nn.Module, forward_methods: Sequence[str] = ()) -> None:
        """`fully_shard` each SwinV2 block of `module`, then `module` itself (once; later calls do nothing).
        `forward_methods` are methods of `module` other than `forward` that run the model (such as SimMIM's
        `reconstruct`): they gather and free the root's weights as `forward` does."""
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        if isinstance(module, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for m in module.modules():
            if isinstance(m, SHARDED_UNITS):
                fully_shard(m, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        # None: FSDP2's default for the root, which keeps its (small) weights gathered until backward
        fully_shard(module, mesh=mesh, reshard_after_forward=None if self.reshard_after_forward else False)
        for name in forward_methods:
            register_fsdp_forward_method(module, name)

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath, storage_options: Any = None) -> None:
        """Write the shard folder beside its final name, then swap it in: a run killed while writing (a periodic
        `last.ckpt` of SwinV2-G is tens of GB) leaves the previous checkpoint whole, not half-new shards beside an
        old `meta.pt`. Needs a filesystem all ranks share. A swap that fails on rank 0 fails on every rank."""
        path = Path(self.broadcast(str(filepath)))
        partial, previous = path.with_name(path.name + ".partial"), path.with_name(path.name + ".previous")
        if self.is_global_zero:
            if previous.exists() and not path.exists():  # a kill between the two renames of the last swap
                previous.rename(path)
            for leftover in (partial, previous):
                _remove(leftover)
        self.barrier("sharded_checkpoint_start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("sharded_checkpoint_written")
        error = None
        if self.is_global_zero:
            try:
                if path.exists():
                    path.rename(previous)
                partial.rename(path)
            except OSError as e:
                error = f"could not move the new checkpoint {partial} to {path}: {e}"
        error = self.broadcast(error)
        if error is not None:
            raise RuntimeError(error)
        if self.is_global_zero:
            _remove(previous)

    def load_checkpoint(self, checkpoint_path, weights_only: Any = None) -> Dict[str, Any]:
        """Check the whole shard folder (`simmim.checkpointing.untrusted.check_sharded_checkpoint`) before Lightning and
        torch.distributed.checkpoint read any of it, then load with `weights_only=True`."""
        path = self.broadcast(str(checkpoint_path))  # the path rank 0 resolved, as Lightning loads it
        check_sharded_checkpoint(path)
        return super().load_checkpoint(path, weights_only=True)


def strategy_with_timeout(strategy: Any, seconds: float) -> Any:
    """`--trainer.strategy NAME` (ddp, zero1, fsdp2, ...) built with collectives that fail after `seconds` instead
    of Lightning's 30 minutes (`--collective_timeout_s`)."""
    known = isinstance(strategy, str) and strategy in StrategyRegistry  # (the registry's `get` builds the strategy)
    entry = StrategyRegistry[strategy] if known else None
    if entry is None or not issubclass(entry["strategy"], (DDPStrategy, ModelParallelStrategy)):
        raise ConfigError(
            f"--collective_timeout_s applies to a data-parallel --trainer.strategy (ddp, zero1, fsdp2, ...), not "
            f"{strategy!r}: give that strategy's own timeout argument instead"
        )
    return entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=seconds))


def finish_distributed() -> None:
    """Destroy the process group before the interpreter exits (the entry points' last call). Left alive, gloo's
    threads sometimes abort the process at exit ("terminate called without an active exception", return code -6)
    after the work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _remove(path: Path) -> None:
    """Delete a file or a folder, if there."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` or a submodule is sharded by FSDP2 (asked of the modules: after an evaluation forward
    under `fsdp2_no_reshard` the parameters are plain tensors for a while)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def full_state_dict(module: nn.Module, keep: bool = True) -> Dict[str, torch.Tensor]:
    """`module.state_dict()` with every DTensor shard gathered into a whole CPU tensor, one tensor at a time.
    Collective under FSDP2: call it on every rank; ranks with `keep=False` (all but the writer) get `{}` and never
    hold more than one whole tensor."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in module.state_dict().items():
        v = v.full_tensor() if isinstance(v, DTensor) else v
        if keep:
            out[k] = v.detach().cpu()
    return out


def optimizer_state_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes of the tensors this rank holds in its optimizers' states (the local shard under ZeRO/FSDP2)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for opt in optimizers:
        opt = getattr(opt, "_optimizer", opt)
        opt = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer's local optimizer
        for state in opt.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor):
                    t = t.to_local() if isinstance(t, DTensor) else t
                    total += t.numel() * t.element_size()
    return total


def register(registry=StrategyRegistry) -> None:
    """Add this module's strategy names to Lightning's registry (done at import); `fsdp` becomes `fsdp2`."""
    entries: Dict[str, tuple] = {
        "zero1": (ZeroOneStrategy, "DDP with ZeRO-1 optimizer-state sharding", {}),
        "fsdp2": (FSDP2Strategy, "FSDP2, each SwinV2 block sharded", {}),
        "fsdp2_no_reshard": (
            FSDP2Strategy,
            "FSDP2 keeping gathered weights forward to backward (ZeRO-2)",
            {"reshard_after_forward": False},
        ),
        "fsdp": (FSDP2Strategy, "FSDP2, each SwinV2 block sharded (Lightning's FSDP1 replaced)", {}),
    }
    for name, (cls, description, init) in entries.items():
        registry.register(name, cls, description=description, override=True, **init)


register()
