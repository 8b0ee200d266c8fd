"""`python -m simmim.export SRC --to FORMAT PATH`: SwinV2 weights written for others to load without this project.

SRC is any file `swinv2.create_model_from_checkpoint` reads: an encoder or classifier export (`.safetensors`), a
Lightning checkpoint of either stage, or another project's SwinV2 file that records or implies its architecture.

- `--to transformers DIR`: a folder `from_pretrained` opens with no code from here: `config.json`,
  `model.safetensors` and `preprocessor_config.json` (the image size, the pixels' scale and the normalisation of
  the file's input record). `--kind` chooses the model: `encoder` (`Swinv2Model`), `classifier`
  (`Swinv2ForImageClassification`, `id2label` from the file's label record) or `mim` (`Swinv2ForMaskedImageModeling`,
  the encoder and SimMIM's decoder, from a pretraining checkpoint). What transformers' Swinv2 cannot express is
  refused in one line (`swinv2.convert.transformers_config`) rather than written to load wrong.
- `--to timm FILE`: the weights in timm's `SwinTransformerV2` layout, which `timm.create_model(...,
  checkpoint_path=FILE)` or `load_state_dict(strict=True)` loads.
- `--to onnx FILE`: the model as an ONNX graph (opset `ONNX_OPSET`, PyTorch's `torch.export`-based exporter) with a
  dynamic batch dimension at the model's image size: input `pixels` (normalised, as the model trains), outputs
  `logits` (a classifier's) and `features` (the pooled encoder features). Checked after writing: onnxruntime's
  outputs against PyTorch's on the same random inputs at batch 1 and 3. One file, up to 1.5 GB of weights (SwinV2-L);
  larger weights (H, G) go to `FILE.data` beside it, which must travel with it.

Every export gets a model card (`simmim.eval.card`): the folder's `README.md`, or `FILE` with the suffix `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import save_file

import swinv2
from simmim.data.loaders import IMAGENET_MEAN, IMAGENET_STD
from simmim.data.pixels import DEPTHS
from simmim.errors import ConfigError, require
from simmim.eval.card import model_card
from swinv2.convert import to_transformers_state_dict, transformers_config
from swinv2.reading import MalformedRecordError

FORMATS = ("transformers", "timm", "onnx")
ONNX_OPSET = 18
ONNX_ATOL = 1e-4  # onnxruntime against PyTorch, fp32
ONNX_MAX_INLINE_BYTES = 1536 << 20  # larger weights go to FILE.data beside FILE (protobuf's 2 GB limit)
KINDS = ("auto", "encoder", "classifier", "mim")
DECODER = ("model.decoder.0.weight", "model.decoder.0.bias")  # SimMIM's 1x1 convolution in a pretraining checkpoint
IMAGENET = {"depth": "uint8", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


@dataclass
class Weights:
    """A weights file read once for an export and its card: its path, the model built from it, its input and label
    records (checked), and of the rest of the file only what `--kind mim` reads (SimMIM's decoder entries, the
    hyper-parameters): a Lightning checkpoint's optimizer state is not kept."""

    path: str
    model: swinv2.SwinTransformerV2
    inputs: Optional[Dict[str, Any]]
    labels: Optional[List[str]]
    decoder: Dict[str, Any]
    hyper_parameters: Dict[str, Any]


def read_weights(src: str) -> Weights:
    """`src` read, its model built and its records checked, once (a Lightning checkpoint may be gigabytes)."""
    raw = swinv2.read_checkpoint(src)
    try:
        model = swinv2.create_model_from_checkpoint(raw, name=src).eval()
        inputs, labels = swinv2.read_inputs(raw, src), swinv2.read_labels(raw, src)
    except MalformedRecordError as e:
        raise ConfigError(str(e)) from None
    state = raw.get("state_dict") if isinstance(raw.get("state_dict"), dict) else raw
    hparams = raw.get("hyper_parameters") if isinstance(raw.get("hyper_parameters"), dict) else {}
    return Weights(src, model, inputs, labels, {k: state.get(k) for k in DECODER}, hparams)


def parse_args(args: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simmim.export", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a weights file: an export, a Lightning checkpoint of either stage, another SwinV2 file")
    p.add_argument("--to", nargs=2, metavar=("FORMAT", "PATH"), required=True,
                   help="transformers DIR (a new or empty folder) or timm FILE (a .safetensors file)")  # fmt: skip
    p.add_argument("--kind", choices=KINDS, default="auto",
                   help="transformers: encoder, classifier or mim (auto: classifier with a head)")  # fmt: skip
    a = p.parse_args(args)
    require(a.to[0] in FORMATS, "--to", a.to[0], f"must be one of {', '.join(FORMATS)}")
    return a


def _check_folder(path: Path) -> None:
    """`path` as a folder to write into: new or empty (a folder of someone's files is not written over)."""
    require(not path.is_symlink() and not path.is_file(), "--to", str(path), "is a file or a link: name a folder")
    if path.is_dir():
        require(not any(path.iterdir()), "--to", str(path), "is a folder that is not empty: name a new one")


def _decoder(weights: Weights) -> Dict[str, torch.Tensor]:
    """SimMIM's decoder weights of a pretraining checkpoint, checked against the encoder."""
    src, model = weights.path, weights.model
    weight, bias = (weights.decoder[k] for k in DECODER)
    shape = (model.encoder_stride**2 * model.in_chans, model.num_features, 1, 1)
    ok = isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
    if not ok or tuple(weight.shape) != shape or tuple(bias.shape) != shape[:1]:
        raise ConfigError(
            f"--kind mim: {src} holds no SimMIM decoder of this encoder ({DECODER[0]}: {shape}); give the "
            "pretraining run's Lightning checkpoint (checkpoints/last.ckpt)"
        )
    return {"decoder.0.weight": weight, "decoder.0.bias": bias}


def preprocessor_config(model: swinv2.SwinTransformerV2, inputs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """transformers' image processor settings (`ViTImageProcessor`, what `AutoImageProcessor` builds for Swinv2):
    resize to the model's image size, rescale by the pixels' full range, normalise with the file's mean and std
    (ImageNet's for a file without an input record)."""
    inputs = inputs or IMAGENET
    height, width = model.img_size
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": height, "width": width},
        "resample": 3,  # bicubic
        "do_rescale": inputs["depth"] != "float32",
        "rescale_factor": 1.0 / DEPTHS[inputs["depth"]],
        "do_normalize": True,
        "image_mean": list(inputs["mean"]),
        "image_std": list(inputs["std"]),
    }


def to_transformers(weights: Weights, folder: str, kind: str = "auto") -> Dict[str, Any]:
    """Write `weights` as a transformers folder (`config.json`, `model.safetensors`, `preprocessor_config.json`,
    `README.md`); returns the config written."""
    src, model, inputs, labels = weights.path, weights.model, weights.inputs, weights.labels
    kind = _kind(weights, kind)
    note: Optional[str] = None
    try:
        config = transformers_config(model)
    except ValueError as e:
        raise ConfigError(f"{src}: {e}") from None
    prefix = "" if kind == "encoder" else "swinv2."  # Swinv2Model's keys, or its place inside the other two
    state = {  # a head only in the classifier, the mask token only in the pretraining model
        k: v
        for k, v in to_transformers_state_dict(model, prefix).items()
        if (kind == "classifier" or not k.startswith("classifier."))
        and (kind == "mim" or k != f"{prefix}embeddings.mask_token")
    }
    if kind == "encoder":
        config["architectures"] = ["Swinv2Model"]
    elif kind == "classifier":
        names = labels or [f"LABEL_{i}" for i in range(model.num_classes)]
        config.update(architectures=["Swinv2ForImageClassification"], id2label=dict(enumerate(names)),
                      label2id={n: i for i, n in enumerate(names)})  # fmt: skip
    else:
        require(model.mask_token is not None, "--kind", kind, f"needs the mask token: {src} has none")
        require(model.img_size[0] == model.img_size[1], "--kind", kind, "needs a square image size (transformers')")
        state.update(_decoder(weights))  # checked before anything is written
        window = weights.hyper_parameters.get("norm_target_patch_size")
        if isinstance(window, int):
            note = (
                f"this model was trained against targets normalised in {window}-pixel windows; transformers' "
                "Swinv2ForMaskedImageModeling computes its loss against the raw pixels: the reconstruction is the "
                "same, its loss is not the training loss"
            )
            print(f"note: {note}")
        config["architectures"] = ["Swinv2ForMaskedImageModeling"]
    task = {"classifier": "image-classification", "encoder": "image-feature-extraction", "mim": "image-to-image"}
    front = f"---\nlibrary_name: transformers\npipeline_tag: {task[kind]}\ntags:\n- swinv2\n- simmim\n---\n\n"
    card = front + model_card(weights, f"transformers {config['architectures'][0]}", Path(folder).name, note)
    out = Path(folder)  # everything is checked and made before the first file is written
    _check_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, out / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(model, inputs), indent=2) + "\n")
    (out / "README.md").write_text(card)
    return config


def _kind(weights: Weights, kind: str) -> str:
    """`--kind` resolved for `weights`: auto is the classifier with a head, else the encoder; a classifier needs
    one."""
    has_head = weights.model.num_classes > 0
    require(kind != "classifier" or has_head, "--kind", kind, f"needs a head: {weights.path} has none")
    return ("classifier" if has_head else "encoder") if kind == "auto" else kind


def sidecar(path: str) -> Path:
    """The model card beside an exported file: `model.onnx` -> `model.md`."""
    return Path(path).with_suffix(".md")


def to_timm(weights: Weights, path: str) -> str:
    """Write `weights` in timm's layout (`swinv2.save_weights(..., "timm")`, with its records); returns the path."""
    try:
        return swinv2.save_weights(path, weights.model, "timm", weights.inputs, weights.labels)
    except ValueError as e:
        raise ConfigError(f"{weights.path}: {e}") from None


class _Outputs(torch.nn.Module):
    """A SwinV2 as the ONNX graph computes it: (logits, features) with its head, else (features,)."""

    def __init__(self, model: swinv2.SwinTransformerV2, head: bool) -> None:
        super().__init__()
        self.model, self.with_head = model, head

    def forward(self, pixels: torch.Tensor) -> Any:
        features = self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)
        return (self.model.head(features), features) if self.with_head else (features,)


def _onnx_modules() -> Any:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 (PyTorch's exporter needs it)
    except ImportError:
        message = "--to onnx needs onnx, onnxscript and onnxruntime: pip install onnx onnxscript onnxruntime"
        raise ConfigError(message) from None
    return onnxruntime


def to_onnx(weights: Weights, path: str, kind: str = "auto") -> float:
    """Write `weights` as an ONNX file at its image size with a dynamic batch, then check it with onnxruntime
    against PyTorch at batch 1 and 3; returns the largest absolute difference."""
    onnxruntime = _onnx_modules()
    model = weights.model
    head = _kind(weights, kind) != "encoder" and model.num_classes > 0
    graph = _Outputs(model, head).eval()
    names = ["logits", "features"] if head else ["features"]
    example = torch.randn(2, model.in_chans, *model.img_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        shapes = {"pixels": {0: batch}}
        external = sum(p.numel() * p.element_size() for p in model.parameters()) > ONNX_MAX_INLINE_BYTES
        torch.onnx.export(graph, (example,), path, input_names=["pixels"], output_names=names,
                          opset_version=ONNX_OPSET, dynamo=True, dynamic_shapes=shapes, external_data=external,
                          verbose=False)  # fmt: skip
        return _check_onnx(onnxruntime, graph, model, path, names)
    except BaseException as e:
        for name in (path, path + ".data"):
            if os.path.exists(name):
                os.remove(name)  # a graph that did not pass its check is not left to be used
        if isinstance(e, (ConfigError, KeyboardInterrupt)):
            raise
        raise ConfigError(f"--to onnx {path}: the export failed ({type(e).__name__}: {str(e)[:300]})") from None


def _check_onnx(onnxruntime: Any, graph: torch.nn.Module, model: Any, path: str, names: List[str]) -> float:
    """The largest difference between onnxruntime's outputs and PyTorch's at batch 1 and 3 (random inputs);
    ConfigError beyond `ONNX_ATOL` or for an output of another shape."""
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for size in (1, 3):
        x = torch.randn(size, model.in_chans, *model.img_size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected = graph(x)
        got = session.run(None, {"pixels": x.numpy()})
        if len(got) != len(names):
            raise ConfigError(f"--to onnx {path}: the graph has {len(got)} outputs, not {len(names)}")
        for name, a, b in zip(names, got, expected):
            if a.shape != tuple(b.shape):
                raise ConfigError(
                    f"--to onnx {path}: onnxruntime's {name} at batch {size} is {a.shape}, not {tuple(b.shape)}"
                )
            worst = max(worst, float((torch.from_numpy(a) - b).abs().max()))
    if not worst <= ONNX_ATOL:
        raise ConfigError(f"--to onnx {path}: onnxruntime differs from PyTorch by {worst:.2e} (more than {ONNX_ATOL})")
    return worst


def _check_target(fmt: str, path: str, kind: str) -> None:
    """The target, before anything is read: for transformers a new or empty folder; for timm or ONNX a new file of
    the format's suffix (with its card, and an ONNX file's `.data`), and the packages ONNX needs."""
    if fmt == "transformers":
        return _check_folder(Path(path))
    suffix = {"timm": ".safetensors", "onnx": ".onnx"}[fmt]
    require(path.endswith(suffix), f"--to {fmt}", path, f"must be a {suffix} file")
    for name in (path, str(sidecar(path)), *([path + ".data"] if fmt == "onnx" else [])):
        require(not os.path.lexists(name), f"--to {fmt}", name, "exists: name a new file")
    if fmt == "onnx":
        _onnx_modules()
    kinds = ("auto", "encoder", "classifier")
    require(kind in kinds, "--kind", kind, f"--to {fmt} writes an encoder or a classifier (no decoder)")


def main(args: Optional[List[str]] = None) -> str:
    a = parse_args(args)
    fmt, path = a.to
    _check_target(fmt, path, a.kind)
    weights = read_weights(a.src)
    if fmt == "transformers":  # its card is the folder's README.md
        config = to_transformers(weights, path, a.kind)
        written = f"{path} ({config['architectures'][0]})"
    else:  # the card made first: a file whose card fails is not written
        card = model_card(weights, f"{fmt} ({Path(path).name})")
        if fmt == "timm":
            written = to_timm(weights, path)
        else:
            worst = to_onnx(weights, path, a.kind)
            written = f"{path} (onnxruntime matches PyTorch at batch 1 and 3 within {worst:.1e})"
        sidecar(path).write_text(card)
    print(f"written: {written}")
    return path
