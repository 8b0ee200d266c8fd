"""The SimMIM pretraining augmentation. It runs once per image in every data-loader worker, so it is written
directly on OpenCV and stops at uint8: crop+resize and flip in the workers; the module normalises the batch on the
training device after the copy (`simmim.stage.StageModule.images`): a quarter of the bytes through the workers' shared
memory, the pinned buffers and the host-to-device copy, and no float pass over the pixels in the workers."""

from __future__ import annotations

from simmim.data.crops import ResizedCrop


class PretrainTransform(ResizedCrop):
    """The official SimMIM-SwinV2 pretraining augmentation (`simmim.data.crops.ResizedCrop` with its defaults): a
    random resized crop of 0.67-1 of the image, aspect ratio 3/4-4/3, bilinear, and a horizontal flip; evaluation
    resizes the whole image."""
