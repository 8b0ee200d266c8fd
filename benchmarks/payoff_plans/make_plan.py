"""Write the study's plan, `benchmarks/payoff_plans/study.json`, for `benchmarks/payoff_study.py` (docs/payoff.md).

Pretraining runs keep a checkpoint every 10 epochs (the pretraining-length axis and the monitors' correlation);
fine-tuning runs count epochs at batch 32 and validate once, after the last one (`--trainer.max_steps -1` and
`--trainer.val_check_interval 1.0` were the defaults when the study ran; they are spelled out so that the plan runs
the same under today's step-based default). Every other setting not named here is the default config's at the time
of the study (2026-12-06).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

PHOTOS = "data/photos/prepared"
OUT = Path(__file__).with_name("study.json")


def pretrain(name: str, photos: bool, epochs: int, *extra: str) -> dict:
    data = ["--data.root", f"{PHOTOS}/train", "--model.knn_root", PHOTOS] if photos else []
    args = ["fit", *data, "--trainer.max_epochs", str(epochs), "--data.num_workers", "0"]
    args += ["--model.knn_every_n_epochs", "10", "--grid.every_n_epochs", str(epochs)]
    args += ["--trainer.default_root_dir", f"runs/study/{name}"]
    args += ["--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint"]
    args += ["--trainer.callbacks.dirpath", f"runs/study/{name}/ckpt", "--trainer.callbacks.every_n_epochs", "10"]
    args += ["--trainer.callbacks.save_top_k", "-1", "--trainer.callbacks.filename", "{epoch}", *extra]
    return {"name": name, "stage": "pretrain", "args": args}


def finetune(
    name: str, photos: bool, fraction: float, epochs: int, seed: int, weights: Optional[str], after: List[str], *extra
) -> dict:
    data = ["--data.root", PHOTOS, "--model.num_classes", "16"] if photos else ["--model.num_classes", "10"]
    args = ["fit", *data, "--data.label_fraction", str(fraction), "--data.batch_size", "32", "--data.num_workers", "0"]
    args += ["--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", str(epochs)]
    args += ["--trainer.default_root_dir", f"runs/study/ft/{name}", "--seed_everything", str(seed)]
    args += [
        "--model.pretrained",
        weights or "null",
        "--trainer.max_steps",
        "-1",
        "--trainer.val_check_interval",
        "1.0",
    ]
    return {"name": name, "stage": "finetune", "args": [*args, *extra], "after": after}


def ckpt(run: str, epoch: int) -> str:
    return f"runs/study/{run}/ckpt/epoch={epoch - 1}.ckpt"


def ft_photos(run: str, epoch: int, fraction: float, epochs: int, decay: str, seed: int, tag: str = "", *extra):
    name = f"ft_photos_{run[10:]}{epoch}_f{fraction}_e{epochs}_ld{decay}{tag}_s{seed}"
    return finetune(name, True, fraction, epochs, seed, ckpt(run, epoch), [run], "--model.layer_decay", decay, *extra)


def scratch(photos: bool, fraction: float, epochs: int, seed: int) -> dict:
    name = f"ft_{'photos' if photos else 'digits'}_scratch_f{fraction}_e{epochs}_s{seed}"
    return finetune(name, photos, fraction, epochs, seed, None, [], "--model.layer_decay", "1.0")


def ft_digits(epoch: int) -> dict:
    name = f"ft_digits_hi{epoch}_f0.1_e100_ld0.9_s0"
    return finetune(
        name, False, 0.1, 100, 0, ckpt("pt_digits_hi", epoch), ["pt_digits_hi"], "--model.layer_decay", "0.9"
    )


HIGH = ("--model.base_lr", "1e-2", "--data.mask_patch_size", "8")  # the candidate pretraining recipe
jobs = [
    # pretraining: the default of the time (base LR 1e-3, 16 px mask patches) and the candidate, 100 epochs each
    pretrain("pt_photos_d", True, 100),
    pretrain("pt_photos_hi", True, 100, *HIGH),
    pretrain("pt_digits_hi", False, 100, *HIGH),
    # the main comparison at 10% and 25% of the labels, scratch's length, the layer decay
    ft_photos("pt_photos_hi", 100, 0.1, 100, "0.9", 0),
    scratch(True, 0.1, 200, 0),
    ft_photos("pt_photos_d", 100, 0.1, 100, "0.9", 0),
    ft_photos("pt_photos_hi", 100, 0.25, 50, "0.9", 0),
    scratch(True, 0.25, 50, 0),
    scratch(True, 0.25, 100, 0),
    ft_photos("pt_photos_hi", 100, 0.1, 100, "1.0", 0),
    ft_photos("pt_photos_hi", 100, 0.1, 100, "0.75", 0),
    # the pretraining length: the candidate run's checkpoints
    *[ft_photos("pt_photos_hi", e, 0.1, 100, "0.9", 0) for e in (10, 20, 40, 60)],
    # the pretrained side's fine-tuning: the window, the learning rate
    ft_photos("pt_photos_hi", 100, 0.1, 100, "0.9", 0, "_w4", "--model.window_size", "4"),
    ft_photos("pt_photos_hi", 100, 0.1, 100, "0.9", 0, "_lr2.5e-3", "--model.base_lr", "2.5e-3"),
    ft_photos("pt_photos_hi", 100, 0.1, 100, "0.9", 0, "_lr1e-2", "--model.base_lr", "1e-2"),
    # the digits at 10% of the labels: scratch and five checkpoints
    scratch(False, 0.1, 100, 0),
    *[ft_digits(e) for e in (100, 30, 10, 60, 20)],
]
# the first scratch run (100 epochs at 10%) ran before this list took its shape
jobs.insert(3, scratch(True, 0.1, 100, 0))

if __name__ == "__main__":
    OUT.write_text(json.dumps(jobs, indent=1))
