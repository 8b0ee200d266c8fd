"""A model card for an export (`simmim.eval.export`): what the weights are and how they were made, generated from the
file's records and its run's folder, never typed by hand.

- The architecture, windows, inputs and classes: the file's records (`swinv2.architecture`, the input and label
  records).
- The recipe: the run's `config.yaml` (the folder holding the file, or the one above `checkpoints/`). For a
  fine-tuning run whose `--model.pretrained` file has a run folder of its own, that run's recipe too.
- The results: the last value of each metric in the run's TensorBoard logs (`val/loss`, `val/knn_acc1`,
  `val/finetune_acc1`, `val/acc1`, `val/acc5`), and the number of training images the run logged.
- The project's version and the command that trains the same recipe again.

The run's files are untrusted like any other: the config is read as plain YAML of at most 1 MiB and only its plain
values are shown (escaped for Markdown); the logs are read by TensorBoard's reader, only the scalars named above.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import swinv2
from simmim.checkpointing.untrusted import MAX_CONFIG_BYTES, read_small, run_folder
from simmim.stage import TRAIN_IMAGES_METRIC as DATA_SIZE

if TYPE_CHECKING:
    from simmim.eval.export import Weights

METRICS = ("val/loss", "val/knn_acc1", "val/finetune_acc1", "val/acc1", "val/acc5")
MAX_EVENT_FILES = 64
MAX_EVENT_BYTES = 64 << 20  # the logs read, all files together (about 10 s of TensorBoard's reading)
RECIPE = {  # section -> fields shown, in order
    "data": ("root", "index", "img_size", "batch_size", "mask_patch_size", "mask_ratio", "val_fraction",
             "label_fraction", "augment", "channels", "depth"),
    "model": ("arch", "encoder_kwargs", "window_size", "pretrained", "base_lr", "warmup_lr", "min_lr", "warmup_epochs",
              "lr_schedule", "weight_decay", "layer_decay", "drop_path_rate", "norm_target_patch_size",
              "label_smoothing", "mixup", "cutmix", "mean", "std"),
    "trainer": ("max_epochs", "max_steps", "precision", "devices", "num_nodes", "strategy", "accumulate_grad_batches"),
}  # fmt: skip


def read_config(folder: Path) -> Dict[str, Any]:
    """A run's `config.yaml` as plain YAML of at most 1 MiB, without aliases or tags, every scalar kept as the
    string it is written as; {} where it cannot be read."""
    import yaml

    try:
        text = read_small(folder / "config.yaml", MAX_CONFIG_BYTES, follow_links=False).decode()
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            return {}  # an alias repeats a node: a few hundred bytes can stand for gigabytes once shown
        config = yaml.load(text, Loader=yaml.BaseLoader)  # every scalar a string: no number is parsed
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        return {}
    return config if isinstance(config, dict) else {}


def final_metrics(folder: Path) -> Dict[str, Tuple[int, float]]:
    """The last (step, value) of each of `METRICS` and `DATA_SIZE` in the run's TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: Dict[str, Tuple[int, int, float]] = {}  # tag -> (wall time order, step, value)
    keep = {"scalars": 1, "images": 1, "audio": 1, "histograms": 1, "compressedHistograms": 1, "tensors": 1}
    budget = MAX_EVENT_BYTES  # all files together: TensorBoard checks every record's checksum in Python
    for path in sorted(glob.glob(glob.escape(str(folder)) + "/events.out.tfevents.*"))[:MAX_EVENT_FILES]:
        if not os.path.isfile(path) or os.path.islink(path) or os.path.getsize(path) > budget:
            continue
        budget -= os.path.getsize(path)
        events = EventAccumulator(path, size_guidance=keep)
        try:
            events.Reload()
        except Exception:  # noqa: BLE001 (a damaged log: its metrics are left out)
            continue
        for tag in set(events.Tags().get("scalars", [])) & {*METRICS, DATA_SIZE}:
            last = events.Scalars(tag)[-1]
            key = (last.wall_time, last.step)
            if tag not in found or key >= found[tag][:2]:
                found[tag] = (*key, float(last.value))
    return {tag: (int(step), value) for tag, (_, step, value) in found.items()}


def _render(value: Any, depth: int = 0) -> str:
    """A value of the config as short text: scalars, and lists and mappings of them 3 deep at most, 20 items each
    (a value is never expanded past what is shown)."""
    if isinstance(value, (list, tuple)) and depth < 3:
        return "[" + ", ".join(_render(v, depth + 1) for v in value[:20]) + (", ..." if len(value) > 20 else "") + "]"
    if isinstance(value, Mapping) and depth < 3:
        if "class_path" in value:
            return _render(value["class_path"], depth + 1)
        items = list(value.items())[:20]
        return "{" + ", ".join(f"{_render(k, 3)}: {_render(v, depth + 1)}" for k, v in items) + "}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return str(value)[:200]
    return f"({type(value).__name__})"


def _plain(value: Any) -> str:
    """A value shown in Markdown: `_render`ed, cut at 200 characters, line breaks and control characters replaced,
    Markdown escaped."""
    text = "".join(ch if ch.isprintable() else " " for ch in _render(value)[:200])
    for ch in "\\`*_[]<>|#&!":
        text = text.replace(ch, "\\" + ch)
    return text


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A section of a run's config (`data`, `model`, `trainer`), {} where it is missing or not a mapping."""
    section = config.get(name)
    return section if isinstance(section, Mapping) else {}


def _recipe(config: Mapping[str, Any]) -> List[str]:
    rows = []
    for section, fields in RECIPE.items():
        values = _section(config, section)
        for name in fields:
            if name in values:
                rows.append(f"| `{section}.{name}` | {_plain(values[name])} |")
    return ["| option | value |", "|---|---|", *rows] if rows else ["(no options recorded)"]


def _results(metrics: Mapping[str, Tuple[int, float]], whose: str) -> List[str]:
    """The metrics table: the last value of each of `METRICS` the logs hold."""
    shown = [(tag, metrics[tag]) for tag in METRICS if tag in metrics]
    if not shown:
        return [f"No metrics were found in {whose.lower()} logs."]
    rows = [f"| {tag} | {value:.4f} | {step} |" for tag, (step, value) in shown]
    return [f"{whose} logs, the last value of each metric:", "", "| metric | value | step |", "|---|---|---|", *rows]


def _stage(config: Mapping[str, Any]) -> str:
    return "pretraining" if "mask_ratio" in _section(config, "data") else "fine-tuning"


def _version() -> str:
    try:
        return importlib.metadata.version("simmim-swinv2")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def model_card(weights: Weights, written: str, title: Optional[str] = None, note: Optional[str] = None) -> str:
    """The Markdown model card of a weights file read for an export (`simmim.eval.export.Weights`: its path, model
    and records), exported as `written` (a description of what was written: "transformers Swinv2Model", ...), with
    an optional `note` under its title."""
    src, model, inputs, labels = weights.path, weights.model, weights.inputs, weights.labels
    arch = swinv2.architecture(model)
    folder = run_folder(src)
    config = read_config(folder) if folder is not None else {}
    metrics = final_metrics(folder) if folder is not None else {}
    lines = [f"# {_plain(title or Path(src).stem)}", ""]
    lines += [f"SwinV2 weights exported as {_plain(written)} by simmim-swinv2 {_version()}."]
    lines += ["", f"Note: {note}", ""] if note else [""]  # our own text
    lines += [
        "## Architecture",
        "",
        f"- Variant: {arch['variant']} (embed dim {arch['embed_dim']}, depths {arch['depths']}, heads "
        f"{arch['num_heads']}, patch {arch['patch_size']}, MLP ratio {arch['mlp_ratio']}).",
        f"- Image size {arch['img_size'][0]}x{arch['img_size'][1]}, {arch['in_chans']} input channel(s).",
        f"- Windows per stage: {[w[0] for w in arch['window_size']]}; position bias pretrained at windows "
        f"{[w[0] for w in arch['pretrained_window_sizes']]} ({arch['position_bias']}).",
        f"- Outputs: {f'{model.num_classes} classes' if model.num_classes else 'features (no head)'}"
        + (f": {', '.join(_plain(n) for n in labels[:20])}{', ...' if len(labels) > 20 else ''}." if labels else "."),
        "",
        "## Inputs",
        "",
    ]
    if inputs:
        scale = {
            "uint8": "8-bit pixels / 255",
            "uint16": "16-bit pixels / 65535",
            "float32": "float pixels as they are",
        }
        lines += [f"- {scale[inputs['depth']]}, then per channel (x - mean) / std with mean {inputs['mean']} and std "
                  f"{inputs['std']}."]  # fmt: skip
    else:
        lines += ["- Not recorded in the file (ImageNet's mean and std are the usual choice for RGB)."]
    lines += ["", "## Data and recipe", ""]
    if folder is None:
        lines += ["The file has no run folder beside it: its data and recipe are not known here.", ""]
    else:
        root = _section(config, "data").get("root")
        images = metrics.get(DATA_SIZE)
        lines += [
            f"Trained by {_stage(config)} on {_plain(root) if root else 'the built-in digits'}"
            + (f" ({int(images[1])} training images)" if images and 0 <= images[1] < 1e12 else "")
            + ". The options of the run's `config.yaml`:",
            "",
            *_recipe(config),
            "",
        ]
        pretrained = _section(config, "model").get("pretrained")
        named = isinstance(pretrained, str) and pretrained not in ("null", "~", "") and os.path.isfile(pretrained)
        earlier = run_folder(pretrained) if named else None
        if earlier is not None and earlier != folder:
            before = read_config(earlier)
            lines += [f"It started from {_plain(pretrained)}, made by this recipe ({_stage(before)}):", ""]
            lines += [*_recipe(before), "", *_results(final_metrics(earlier), "That run's"), ""]
    lines += ["## Results", "", *_results(metrics, "The run's")]
    lines += ["", "## Reproduce", ""]
    path = str(folder / "config.yaml") if folder is not None else ""
    if config and path.isprintable() and "`" not in path:
        command = "simmim.pretrain" if _stage(config) == "pretraining" else "simmim.finetune fit"
        lines += ["```bash", f"python -m {command} --config {shlex.quote(path)}", "```"]
    else:
        lines += ["No run configuration was found beside the file."]
    return "\n".join(lines) + "\n"
