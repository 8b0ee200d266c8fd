"""Optimizer parameter groups and the per-step LR schedule of the official SimMIM/SwinV2 recipes, and the
layer-wise learning-rate decay of fine-tuning.

Layer decay follows the official `get_swin_layer` mapping (docs/recipes.md). Layer ids: `mask_token` and
`patch_embed` 0; block j of stage i `sum(depths[:i]) + j + 1`; the downsample at the end of stage i
`sum(depths[:i+1])`; everything else `sum(depths) + 1`: the final norm and the head, and also `absolute_pos_embed`
(the official map names no other parameter, so it gets the full learning rate). A parameter of layer id l gets
`lr * decay ** (sum(depths) + 1 - l)`, so the lowest layer's share of the learning rate is
`decay ** (sum(depths) + 1)`: 0.75 gives the official 24-block SwinV2-B 0.00075 but an 8-block model 0.075.
`depth_scaled_decay` keeps that share when the depth changes (docs/payoff.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
from pytorch_lightning.utilities import rank_zero_info

from simmim.errors import ConfigError


def is_no_decay(name: str, param: torch.Tensor, skip_names: Set[str] = frozenset()) -> bool:
    """The official rule: 1-D parameters (norm weights), biases and `skip_names` (the model's `no_weight_decay()`:
    `logit_scale`, `cpb_mlp`, `mask_token`, ...) get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or name in skip_names


def param_groups_weight_decay(
    named_params: Iterable, weight_decay: float, skip_names: Set[str] = frozenset()
) -> List[Dict]:
    """Two AdamW groups: decayed weights, and the rest (1-D params, biases, names in `skip_names`).

    The official pretraining code prefixes its skip keywords with `encoder.` and so never matches them: it
    decays `logit_scale` and `cpb_mlp` (Swin-Transformer issue #369). Here the model's full parameter names are
    matched, so they are excluded, as in the official fine-tuning code.
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if is_no_decay(name, p, skip_names):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    warmup_factor: float,
    min_factor: float,
    schedule: str = "cosine",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """LR multiplier at `step`: linear warmup from `warmup_factor` to 1, then cosine down to `min_factor` or
    multistep decay by `gamma` at each milestone step (the official pretraining uses multistep at epoch 700)."""
    if step < warmup_steps:
        return warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
    if schedule == "multistep":
        return gamma ** sum(step >= m for m in milestones)
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule must be 'cosine' or 'multistep', got {schedule!r}")


def scaled_lr(base_lr: float, total_batch: int, enabled: bool = True, reference_batch: int = 512) -> float:
    """Official linear scaling rule: lr = base_lr * total_batch / 512."""
    return base_lr * total_batch / reference_batch if enabled else base_lr


@dataclass(frozen=True)
class ScheduleLengths:
    """What a per-step schedule needs from the run.

    Attributes:
        steps_per_epoch: Optimizer steps per epoch: ceil(train batches / gradient accumulation).
        total_steps: Optimizer steps of the whole run (`max_steps` when it ends the run first); None when the run
            has no end (`max_epochs=-1` without `max_steps`).
        total_batch: Images per optimizer step over all ranks: per-device batch x world size x accumulation.
    """

    steps_per_epoch: int
    total_steps: Optional[int]
    total_batch: int


def _train_loader_and_batches(trainer) -> Tuple[Any, Union[int, float]]:
    """The train loader and Lightning's number of batches per epoch (`limit_train_batches` applied), without
    setting up Lightning's train loader early: set up before a resumed run's loop state is restored, the loader
    would not get its saved position back (Lightning issue #20550)."""
    if trainer.train_dataloader is not None:
        return trainer.train_dataloader, trainer.num_training_batches
    if trainer.datamodule is None:  # loaders passed to fit(): only Lightning can build them
        trainer.fit_loop.setup_data()
        return trainer.train_dataloader, trainer.num_training_batches
    loader = trainer.datamodule.train_dataloader()
    length, limit = (len(loader) if hasattr(loader, "__len__") else math.inf), trainer.limit_train_batches
    if isinstance(limit, int):
        return loader, min(length, limit)
    return loader, (length if math.isinf(length) else int(length * limit))


def schedule_lengths(trainer) -> ScheduleLengths:
    """Read the schedule's lengths from a trainer inside `configure_optimizers`: batches per epoch from the train
    loader, `limit_train_batches` and `accumulate_grad_batches`; the run's end from `max_epochs` and `max_steps`
    (as Lightning's `estimated_stepping_batches`); the per-device batch from the loader, the world size from the
    trainer."""
    loader, batches = _train_loader_and_batches(trainer)
    per_device = loader.batch_size if loader.batch_size is not None else loader.batch_sampler.batch_size
    accumulate = trainer.accumulate_grad_batches
    if math.isinf(batches):
        raise ConfigError("the LR schedule counts epochs: the training set needs a length (a map-style dataset)")
    steps_per_epoch = max(1, math.ceil(batches / accumulate))
    total = math.inf if trainer.max_epochs == -1 else steps_per_epoch * max(trainer.max_epochs, 1)
    if trainer.max_steps != -1:
        total = min(total, trainer.max_steps)
    return ScheduleLengths(
        steps_per_epoch=steps_per_epoch,
        total_steps=None if math.isinf(total) else int(total),
        total_batch=per_device * trainer.world_size * accumulate,
    )


# The recipe hyper-parameters `configure_adamw` takes, as both stages name them.
SCHEDULE_KEYS = ("base_lr", "warmup_lr", "min_lr", "scale_lr", "warmup_epochs", "betas", "eps")


def configure_adamw(
    trainer,
    groups: List[Dict],
    base_lr: float,
    warmup_lr: float,
    min_lr: float,
    scale_lr: bool,
    warmup_epochs: float,
    betas,
    eps: float,
    schedule: str = "cosine",
    milestone_epochs: Sequence[int] = (),
    gamma: float = 0.1,
):
    """AdamW with a per-step LambdaLR, in Lightning's `configure_optimizers` format; under `--trainer.strategy
    zero1` the AdamW is wrapped in `ZeroRedundancyOptimizer`, so each rank keeps its share of the states.

    LRs are per 512 images and scaled by the total batch (per-device batch x world size x accumulation, read from
    the trainer) when `scale_lr`. Warmup and milestones are in epochs of `steps_per_epoch` optimizer steps, so a
    run that `max_steps` ends early keeps the recipe's warmup; cosine decays to the run's last step. A group's
    `lr_scale` (layer decay) multiplies every LR of the schedule, as in timm's schedulers.

    Raises:
        ConfigError: a cosine schedule for a run without an end (`max_epochs=-1` and no `max_steps`).
    """
    lengths = schedule_lengths(trainer)
    if lengths.total_steps is None and schedule == "cosine":
        raise ConfigError(
            "the cosine LR schedule needs the run's length: set --trainer.max_epochs or --trainer.max_steps "
            "(or use --model.lr_schedule multistep in pretraining)"
        )
    lr, warmup_lr, min_lr = (scaled_lr(v, lengths.total_batch, scale_lr) for v in (base_lr, warmup_lr, min_lr))
    total_steps = lengths.total_steps or 0
    warmup_steps = int(warmup_epochs * lengths.steps_per_epoch)
    milestones = [m * lengths.steps_per_epoch for m in milestone_epochs]
    rank_zero_info(
        f"LR schedule: {schedule}, {lengths.steps_per_epoch} steps/epoch, warmup {warmup_steps} steps, "
        f"{lengths.total_steps or 'no end'} steps in all; total batch {lengths.total_batch}, peak LR {lr:.3g}"
    )
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    adamw = dict(lr=lr, betas=tuple(betas), eps=eps)
    if getattr(trainer.strategy, "shards_optimizer_state", False):  # `--trainer.strategy zero1`
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **adamw)
    else:
        opt = torch.optim.AdamW(groups, **adamw)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: lr_factor(s, warmup_steps, total_steps, warmup_lr / lr, min_lr / lr, schedule, milestones, gamma),
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def drop_nonfinite_grads(module: torch.nn.Module) -> bool:
    """Skip an optimizer step whose gradients hold inf/NaN (e.g. an fp16 overflow) by clearing every gradient:
    AdamW then leaves all parameters and moments untouched. Under DDP the gradients are already all-reduced, but
    under FSDP2 each rank holds a shard of them: with a process group up the ranks agree by an all-reduce, so
    every rank takes the same decision. Returns True when the step was skipped."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    device = next(module.parameters()).device
    finite = torch.stack([torch.isfinite(g).all() for g in local]).all() if local else torch.tensor(True, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = finite.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = flag.bool()
    if finite:
        return False
    for p in module.parameters():
        p.grad = None
    return True


def depth_scaled_decay(layer_decay: float, depth: int, reference_depth: Optional[int]) -> float:
    """The per-layer factor for a model of `depth` blocks whose lowest layer gets the share of the learning rate,
    `layer_decay ** (reference_depth + 1)`, that `layer_decay` gives a model of `reference_depth` blocks; None:
    `layer_decay` as it is (the official recipes, written for their own depth)."""
    if reference_depth is None:
        return layer_decay
    if reference_depth < 1:
        raise ValueError(f"--model.layer_decay_depth {reference_depth}: must be a block count (1 or more) or null")
    return layer_decay ** ((reference_depth + 1) / (depth + 1))


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """Layer id of an encoder parameter name in the official layout (no prefix)."""
    if name == "mask_token" or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers."):
        parts = name.split(".")
        stage = int(parts[1])
        if parts[2] == "downsample":
            return sum(depths[: stage + 1])
        return sum(depths[:stage]) + int(parts[3]) + 1
    return sum(depths) + 1


def layer_decay_param_groups(
    named_params: Iterable[Tuple[str, torch.nn.Parameter]],
    depths: Sequence[int],
    weight_decay: float,
    layer_decay: float,
    skip_names: Set[str] = frozenset(),
) -> List[Dict]:
    """AdamW groups keyed by (layer id, decayed?), each with `lr_scale`; 1-D params, biases and `skip_names`
    get no weight decay."""
    last = sum(depths) + 1
    groups: Dict[Tuple[int, bool], Dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        layer = swin_layer_id(name, depths)
        no_decay = is_no_decay(name, p, skip_names)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (last - layer),
                "layer_id": layer,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]
