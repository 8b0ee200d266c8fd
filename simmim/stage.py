"""What both stages' LightningModules share, in one base class (`StageModule`), so that the stages cannot drift:

- each training batch's random draws (drop-path, dropout, mixup) seeded from (run seed, rank, epoch, batch index)
  before the batch (`simmim.seeding.seed_step`), so ranks differ and a resumed run repeats the interrupted one;
- an optimizer step whose gradients hold inf or NaN skipped, counted, printed and logged (`train/skipped_steps`);
- under a sharded strategy (`fsdp2`), the module's `model` sharded block by block (`configure_model`), and the
  stand-in forward of a rank whose evaluation batch came out empty;
- the checkpoint contract's architecture record of the stage's SwinV2 (`swin`) in every checkpoint;
- the images a step is given: uint8 batches normalised with the module's own `mean` and `std` on the training
  device right after the copy (`images`, `on_after_batch_transfer`), float batches taken as normalised already.

A stage builds `self.model` (what is sharded and run), names its SwinV2 (`swin`) and passes its input size and
normalisation.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import pytorch_lightning as pl
import torch

import swinv2
from simmim.data.images import normalize_images
from simmim.data.loaders import IMAGENET_MEAN, IMAGENET_STD
from simmim.distributed import is_sharded
from simmim.errors import ConfigError, require
from simmim.optim import drop_nonfinite_grads
from simmim.seeding import seed_step
from swinv2.checkpoint import INPUTS_KEY, LABELS_KEY, check_inputs
from swinv2.reading import MalformedRecordError

TRAIN_IMAGES_METRIC = "data/train_images"  # logged at the start of training: the number of training images

_TRUE_PRECISION = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


class StageModule(pl.LightningModule):
    """Base of `SimMIMPretrainer` and `SwinV2Classifier`.

    Under sharding, run the model through `self.model(...)` or one of `SHARDED_FORWARD_METHODS`, on every rank: a
    forward gathers weights from all ranks, and a submodule called directly (`self.model.encoder`) would find its
    root's weights still sharded.

    Args:
        img_size: The input size (square), for `blank_images`.
        mean, std: The normalisation of the input images (per channel, as fractions of the pixel range); None or
            "auto": the data module's, taken in `setup` (it works them out) and recorded in the hyper-parameters
            (until then, None is ImageNet's for 3 channels).
        channels: Channels per input image.
    """

    SHARDED_FORWARD_METHODS: Sequence[str] = ()

    def __init__(
        self,
        img_size: int,
        mean: Optional[Union[Sequence[float], str]] = IMAGENET_MEAN,
        std: Optional[Union[Sequence[float], str]] = IMAGENET_STD,
        channels: int = 3,
    ) -> None:
        super().__init__()
        self.input_size, self.channels = img_size, channels
        self.from_data = {"mean": mean is None or mean == "auto", "std": std is None or std == "auto"}
        imagenet = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD} if channels == 3 else {}
        self.mean = self._per_channel("mean", imagenet.get("mean") if mean is None else mean)
        self.std = self._per_channel("std", imagenet.get("std") if std is None else std)
        self.skipped_steps = 0  # optimizer steps skipped for non-finite gradients, in this process's run

    def _per_channel(self, name: str, values: Any) -> Optional[Tuple[float, ...]]:
        """The mean or std `values` as one float per channel, or None where they come from the data."""
        if values is None or isinstance(values, str):
            require(values in (None, "auto"), f"--model.{name}", values, "must be values per channel or auto")
            return None
        require(
            len(values) == self.channels and (name == "mean" or all(v > 0 for v in values)),
            f"--model.{name}",
            list(values),
            f"must hold one {'' if name == 'mean' else 'positive '}value per channel ({self.channels})",
        )
        return tuple(float(v) for v in values)

    @property
    def swin(self) -> swinv2.SwinTransformerV2:
        """The SwinV2 whose architecture the checkpoints record."""
        raise NotImplementedError

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as every step takes it: uint8 images (what pretraining's loaders deliver) normalised with the module's
        `mean` and `std` on their device, in float32 (in the weights' dtype under a `-true` precision); float images
        are taken as normalised already (fine-tuning's loaders normalise before random erasing)."""
        if x.dtype not in (torch.uint8, torch.uint16):
            return x
        precision = str(self._trainer.precision) if self._trainer is not None else ""
        return normalize_images(x, self.mean, self.std, _TRUE_PRECISION.get(precision, torch.float32))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A batch's images (its first element) through `images` right after the copy to the training device, so
        that the steps and the callbacks that read the batch see the same normalised floats, whoever made the
        loader. (Lightning runs a data module's own hook instead, if it has one; the steps still call `images`.)"""
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            return (self.images(batch[0]), *batch[1:])
        return batch

    def setup(self, stage: str) -> None:
        """A data module that normalises its images itself (fine-tuning's: random erasing needs normalised pixels)
        must use the module's `mean` and `std`: float batches are taken as they come, so a mismatch is refused.
        Lightning's warning that the module, not the data module, has `on_after_batch_transfer` is silenced for
        these runs: that is the design."""
        warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`")
        data = self.trainer.datamodule
        for name in ("mean", "std"):
            theirs, ours = getattr(data, name, None), getattr(self, name)
            if self.from_data[name] and theirs is not None:  # the data's, as it worked them out
                setattr(self, name, self._per_channel(name, theirs))
                self.hparams[name] = list(getattr(self, name))  # what the checkpoints and exports record
            elif ours is None:
                raise ConfigError(f"--model.{name} auto: the data module gives no {name} (give values)")
            elif theirs is not None and tuple(float(v) for v in theirs) != ours:
                raise ConfigError(
                    f"the data module normalises with {name} {list(theirs)}, the module with {list(ours)}: give "
                    f"both the same values (on the command line, --model.{name} sets both)"
                )

    def on_train_start(self) -> None:
        """The number of training images goes into the run's logs (`data/train_images`, step 0), beside the
        metrics: what a model card reads back (`simmim.eval.card`)."""
        files = getattr(self._datamodule(), "train_files", None)
        if files is not None and self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics({TRAIN_IMAGES_METRIC: float(len(files))}, step=0)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_step(self.global_rank, self.current_epoch, batch_idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        if drop_nonfinite_grads(self):
            self.skipped_steps += 1
            print(
                f"step {self.global_step}: non-finite gradients, optimizer step skipped ({self.skipped_steps} so far)"
            )
        if self._trainer is not None:
            self.log("train/skipped_steps", float(self.skipped_steps))

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        swinv2.add_record(checkpoint, self.swin)
        if self.mean is not None and self.std is not None:
            checkpoint[INPUTS_KEY] = self.input_record()
        labels = self.labels()
        if labels is not None:
            checkpoint[LABELS_KEY] = labels

    def labels(self) -> Optional[List[str]]:
        """The class names of the classifier's outputs: the data module's classes when the encoder has a head of
        as many outputs (None for an encoder, or without a data module)."""
        classes = getattr(self._datamodule(), "classes", None)
        num_classes = getattr(self.swin, "num_classes", 0)
        return list(classes) if num_classes and classes is not None and len(classes) == num_classes else None

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """A checkpoint trained on other inputs than this run's (another pixel type, another normalisation: a
        resume whose "auto" statistics came out otherwise, on other data or with another sample) is refused before
        a step: the weights would see pixels they were not trained on."""
        record = checkpoint.get(INPUTS_KEY)
        if not isinstance(record, dict) or self.mean is None or self.std is None:
            return
        ours = self.input_record()
        try:
            theirs = check_inputs(record, self.channels, "the checkpoint")
        except MalformedRecordError:
            theirs = None
        same = (
            theirs is not None
            and theirs["depth"] == ours["depth"]
            and all(
                math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
                for k in ("mean", "std")
                for a, b in zip(theirs[k], ours[k])
            )
        )
        if not same:
            raise ConfigError(
                f"the checkpoint was trained on {record.get('depth')} pixels normalised with mean {record.get('mean')} "
                f"and std {record.get('std')}; this run gives {ours['depth']} pixels, mean {ours['mean']}, std "
                f"{ours['std']}: pass the checkpoint's --model.mean and --model.std (and the same data)"
            )

    def _datamodule(self) -> Any:
        """The trainer's data module, or None (no trainer, or a trainer without one)."""
        return getattr(self._trainer, "datamodule", None)

    def input_record(self) -> Dict[str, Any]:
        """What the model's inputs are: the pixels' type (the data module's) and the normalisation, which every
        weights file written from this module records (`swinv2.read_inputs`)."""
        pixels = getattr(self._datamodule(), "pixels", None)
        depth = pixels.depth if pixels is not None else "uint8"
        return {"depth": depth, "mean": list(self.mean or ()), "std": list(self.std or ())}

    def configure_model(self) -> None:
        shard = getattr(self.trainer.strategy, "shard", None)  # the strategies of simmim.distributed
        if shard is not None:
            shard(self.model, self.SHARDED_FORWARD_METHODS)

    @torch.no_grad()
    def join_sharded_forward(self, *inputs: torch.Tensor) -> None:
        """For a rank whose batch came out empty (every file unreadable) in validation or prediction: under
        sharding the others' forward waits on this rank's share of the weights, so run the model on `inputs` (a
        blank stand-in) and drop the result. Without sharding it does nothing."""
        if is_sharded(self.model):
            self.model(*inputs)

    def blank_images(self) -> torch.Tensor:
        """One black image of the module's input size, (1, 3, S, S), on its device, normalised as a batch is."""
        shape = (1, self.channels, self.input_size, self.input_size)
        return self.images(torch.zeros(shape, dtype=torch.uint8, device=self.device))
