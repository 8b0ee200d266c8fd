"""Sharded data-parallel training through Lightning's strategies, by name (`--trainer.strategy NAME`).

- `zero1`: DDP with the AdamW states sharded across ranks (ZeRO stage 1, as the SwinV2 paper trains SwinV2-G):
  `torch.distributed.optim.ZeroRedundancyOptimizer`. Weights and gradients stay replicated; checkpoints gather
  the optimizer states on rank 0 into one file. DDP's gradient buckets double as the gradients
  (`gradient_as_bucket_view`), saving a copy of them. Runs on CPU (gloo) and GPU (NCCL).
- `fsdp2`: FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's `ModelParallelStrategy`: weights,
  gradients and optimizer states sharded, each SwinV2 block its own unit, gathered for its forward and backward
  and freed after. Checkpoints are folders of per-rank shards (torch.distributed.checkpoint). CPU and GPU.
- `fsdp2_no_reshard`: as `fsdp2`, but a block's gathered weights stay until its backward (ZeRO stage 2: less
  communication, more memory).
- `fsdp`: Lightning's FSDP1 strategy (GPU only; Lightning refuses it on CPU) with each SwinV2 block wrapped.

Activation checkpointing (`--model.use_checkpoint true`) and sequential attention
(`--model.encoder_kwargs '{"attn_chunk_size": 1}'`) combine with every one of them.
"""

from __future__ import annotations

from typing import Dict, Iterable, Sequence

import torch
import torch.nn as nn
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, StrategyRegistry

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
                raise TypeError(
                    f"--trainer.strategy zero1 shards a ZeroRedundancyOptimizer, but configure_optimizers returned "
                    f"{type(inner).__name__}: build it with simmim.optim.configure_adamw, or use --trainer.strategy "
                    "fsdp2, which shards any optimizer"
                )


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all processes: every SwinV2 block, then the whole model, `fully_shard`ed in the
    module's `configure_model` (`ShardedModel`). `reshard_after_forward=False` keeps each block's gathered weights
    from its forward to its backward (ZeRO-2)."""

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
        fully_shard(module, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        for name in forward_methods:
            register_fsdp_forward_method(module, name)


class ShardedModel:
    """LightningModule mixin: under `fsdp2` (any strategy with a `shard` method), `configure_model` shards the
    module's `model` attribute block by block. Under other strategies it does nothing. Under sharding, run the model
    through `self.model(...)` or one of `SHARDED_FORWARD_METHODS`, on every rank: a forward gathers weights from
    all ranks, and a submodule called directly (`self.model.encoder`) would find its root's weights still sharded."""

    SHARDED_FORWARD_METHODS: Sequence[str] = ()

    def configure_model(self) -> None:
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None:
            shard(self.model, self.SHARDED_FORWARD_METHODS)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of `module` is a DTensor shard (FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """`module.state_dict()` with every DTensor shard gathered into a whole CPU tensor. Collective under FSDP2:
    call it on every rank, in the same order."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in module.state_dict().items():
        out[k] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
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
    """Add this module's strategy names to Lightning's registry (done at import), and give Lightning's own `fsdp`
    the per-block wrapping."""
    entries: Dict[str, tuple] = {
        "zero1": (ZeroOneStrategy, "DDP with ZeRO-1 optimizer-state sharding", {}),
        "fsdp2": (FSDP2Strategy, "FSDP2, each SwinV2 block sharded", {}),
        "fsdp2_no_reshard": (FSDP2Strategy, "FSDP2 keeping gathered weights forward to backward (ZeRO-2)", {}),
        "fsdp": (FSDPStrategy, "FSDP1 (GPU) with each SwinV2 block wrapped", {"auto_wrap_policy": set(SHARDED_UNITS)}),
    }
    entries["fsdp2_no_reshard"][2]["reshard_after_forward"] = False
    for name, (cls, description, init) in entries.items():
        registry.register(name, cls, description=description, override=True, **init)


register()
