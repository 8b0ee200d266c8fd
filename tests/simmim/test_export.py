"""`python -m simmim.export`: our weights written for transformers (checked by loading them with transformers'
`from_pretrained`, the oracle) and for timm (loaded by timm with strict=True)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import RUN_MEAN, RUN_STD, TINY, randomize_

import swinv2
from simmim.errors import ConfigError
from simmim.eval.export import main as export
from simmim.pretrain.model import SimMIM

transformers = pytest.importorskip("transformers")


def _export(src, folder, kind="auto"):
    export([str(src), "--to", "transformers", str(folder), "--kind", kind])
    return json.loads((folder / "config.json").read_text())


def test_an_encoder_export_loads_as_transformers_swinv2model_with_the_same_features(tmp_path):
    model = randomize_(swinv2.SwinTransformerV2(**{**TINY, "num_classes": 0}, mask_token=True)).eval()
    inputs = {"depth": "uint16", "mean": [0.2, 0.3, 0.4], "std": [0.1, 0.2, 0.3]}
    src = swinv2.save_weights(tmp_path / "encoder.safetensors", model, inputs=inputs)
    config = _export(src, tmp_path / "hf")
    assert config["architectures"] == ["Swinv2Model"] and config["window_size"] == 4
    hf = transformers.Swinv2Model.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).last_hidden_state, model.forward_features(x).flatten(1, 2), atol=1e-5, rtol=0)
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 32} and processor["rescale_factor"] == 1 / 65535
    assert processor["image_mean"] == inputs["mean"] and processor["image_std"] == inputs["std"]
    image_processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert list(image_processor.image_mean) == inputs["mean"]


def test_a_classifier_fine_tuned_at_another_window_loads_as_transformers_classifier_with_its_labels(tmp_path):
    """Pretrained at window 4, fine-tuned at 64 px and window 8: transformers rebuilds the same position bias from
    `pretrained_window_sizes` and gives the same logits; the label record becomes `id2label`."""
    arch = {**TINY, "img_size": 64, "window_size": 8, "num_classes": 3}
    model = randomize_(swinv2.SwinTransformerV2(**arch, pretrained_window_sizes=(4, 4))).eval()
    src = swinv2.save_weights(tmp_path / "classifier.safetensors", model, labels=["cat", "dog", "fish"])
    config = _export(src, tmp_path / "hf")
    assert config["pretrained_window_sizes"] == [4, 4] and config["id2label"] == {"0": "cat", "1": "dog", "2": "fish"}
    hf = transformers.Swinv2ForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == {0: "cat", 1: "dog", 2: "fish"}
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=0)


def test_a_pretraining_checkpoint_loads_as_transformers_masked_image_model_with_the_same_loss(
    pretraining_run, tmp_path, capsys
):
    """The shared pretraining run's Lightning checkpoint, encoder and decoder: transformers' reconstruction and its
    masked L1 loss are ours (the run trains against the raw pixels, as the default recipe does and as transformers'
    loss computes; a checkpoint trained against locally normalised targets, the official recipes', is exported with
    a note that transformers' loss is not its training loss)."""
    assert pretraining_run.cli.model.hparams.norm_target_patch_size is None
    config = _export(pretraining_run.checkpoint, tmp_path / "hf", kind="mim")
    assert "normalised in" not in capsys.readouterr().out
    assert config["architectures"] == ["Swinv2ForMaskedImageModeling"] and config["encoder_stride"] == 8
    hf = transformers.Swinv2ForMaskedImageModeling.from_pretrained(tmp_path / "hf").eval()
    module = pretraining_run.cli.model
    ours = SimMIM(swinv2.create_model_from_checkpoint(pretraining_run.checkpoint), 8).eval()
    ours.decoder.load_state_dict(module.model.decoder.state_dict())
    x, mask = torch.randn(3, 3, 32, 32), torch.rand(3, 8, 8) < 0.5
    with torch.no_grad():
        out = hf(x, bool_masked_pos=mask.flatten(1))
        torch.testing.assert_close(out.reconstruction, ours.reconstruct(x, mask), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.loss, ours(x, mask), atol=1e-5, rtol=0)
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == pytest.approx(RUN_MEAN) and processor["image_std"] == pytest.approx(RUN_STD)

    raw = swinv2.read_checkpoint(pretraining_run.checkpoint)
    raw["hyper_parameters"] = {**raw["hyper_parameters"], "norm_target_patch_size": 47}
    torch.save(raw, tmp_path / "normalised.ckpt")
    _export(tmp_path / "normalised.ckpt", tmp_path / "hf47", kind="mim")
    assert "trained against targets normalised in 47-pixel windows" in capsys.readouterr().out
    card = (tmp_path / "hf47" / "README.md").read_text()
    assert "Note: this model was trained against targets normalised in 47-pixel windows; transformers' " in card
    assert "its loss is not the training loss" in card


@pytest.mark.parametrize(
    "arch, reason",
    [
        ({"extra_norm_period": 1}, "a LayerNorm on the main branch every 1 blocks"),
        ({"position_bias": "table"}, "the position bias 'table'"),
        ({"img_size": 64, "window_size": (8, 4)}, "stage 2's window \\[4, 4\\] and shift \\[0, 0\\]: its one window "
         "\\(8\\), clamped to the map's height, gives 8 and shift 0"),
        ({"img_size": 40, "window_size": 3}, "stage 1's 10x10 map, not whole windows of 3"),  # padded, shifted
        ({"img_size": (64, 32), "window_size": 4}, "stage 2's window \\[4, 4\\] and shift \\[2, 0\\]"),  # not square
        ({"img_size": 28, "window_size": 7}, "an image size \\[28, 28\\] whose feature maps halve to an odd size"),
        ({"pretrained_window_sizes": (4, 1)}, "a position-bias window of 1"),  # NaN in transformers
    ],
)  # fmt: skip
def test_what_transformers_swinv2_cannot_express_is_refused_in_one_line(tmp_path, arch, reason):
    """Each of these would load into transformers without an error and compute something else."""
    model = swinv2.SwinTransformerV2(**{**TINY, **arch})
    src = swinv2.save_weights(tmp_path / "w.safetensors", model)
    with pytest.raises(ConfigError, match=f"transformers' Swinv2 cannot express {reason}") as refused:
        _export(src, tmp_path / "hf")
    assert "\n" not in str(refused.value) and not (tmp_path / "hf").exists()


def test_mim_needs_a_decoder_and_nothing_is_written_over(tmp_path):
    model = swinv2.SwinTransformerV2(**{**TINY, "num_classes": 0}, mask_token=True)
    src = swinv2.save_weights(tmp_path / "encoder.safetensors", model)
    with pytest.raises(ConfigError, match="holds no SimMIM decoder of this encoder.*checkpoints/last.ckpt"):
        _export(src, tmp_path / "hf", kind="mim")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a folder that is not empty"):
        _export(src, tmp_path / "full")


def test_the_timm_export_loads_into_timm_strictly_with_the_same_features(tmp_path):
    import timm
    from safetensors.torch import load_file

    model = randomize_(swinv2.SwinTransformerV2(**TINY)).eval()
    labels = [f"class {i}" for i in range(model.num_classes)]
    src = swinv2.save_weights(tmp_path / "classifier.safetensors", model, labels=labels)
    export([str(src), "--to", "timm", str(tmp_path / "timm.safetensors")])
    theirs = timm.create_model(
        "swinv2_tiny_window8_256",
        pretrained=False,
        img_size=32,
        embed_dim=TINY["embed_dim"],
        depths=TINY["depths"],
        num_heads=TINY["num_heads"],
        window_size=4,
        num_classes=model.num_classes,
    ).eval()
    theirs.load_state_dict(load_file(tmp_path / "timm.safetensors"), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=0)
    raw = swinv2.read_checkpoint(tmp_path / "timm.safetensors")
    assert swinv2.read_labels(raw) == labels


def _onnx_outputs(path, x):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [o.name for o in session.get_outputs()], session.run(None, {"pixels": x.numpy()})


def test_an_onnx_export_matches_pytorch_at_batch_1_and_3(tmp_path, capsys):
    """A tiny classifier: onnxruntime's logits and pooled features are PyTorch's (atol 1e-4) at batch 1 and 3 (the
    batch is dynamic, the image size fixed); an encoder-only export has the features alone."""
    pytest.importorskip("onnxruntime")
    model = randomize_(swinv2.SwinTransformerV2(**TINY)).eval()
    src = swinv2.save_weights(tmp_path / "classifier.safetensors", model)
    export([str(src), "--to", "onnx", str(tmp_path / "classifier.onnx")])
    assert "onnxruntime matches PyTorch at batch 1 and 3" in capsys.readouterr().out
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        names, (logits, features) = _onnx_outputs(tmp_path / "classifier.onnx", x)
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(x), atol=1e-4, rtol=0)
            pooled = model.forward_head(model.forward_features(x), pre_logits=True)
            torch.testing.assert_close(torch.from_numpy(features), pooled, atol=1e-4, rtol=0)
        assert names == ["logits", "features"]
    export([str(src), "--to", "onnx", str(tmp_path / "encoder.onnx"), "--kind", "encoder"])
    names, outputs = _onnx_outputs(tmp_path / "encoder.onnx", torch.randn(2, 3, 32, 32))
    assert names == ["features"] and outputs[0].shape == (2, model.num_features)
    with pytest.raises(ConfigError, match="exists: name a new file"):
        export([str(src), "--to", "onnx", str(tmp_path / "encoder.onnx")])


@pytest.mark.slow
def test_a_swinv2_tiny_at_192_px_window_12_exports_to_onnx_and_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    model = randomize_(swinv2.create_model("swinv2_tiny", img_size=192, window_size=12, num_classes=10)).eval()
    src = swinv2.save_weights(tmp_path / "tiny.safetensors", model)
    export([str(src), "--to", "onnx", str(tmp_path / "tiny.onnx")])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 192, 192)
        _, (logits, _) = _onnx_outputs(tmp_path / "tiny.onnx", x)
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(x), atol=1e-4, rtol=0)


def _logged(folder):
    """The TensorBoard log of a run's folder, read with TensorBoard's own reader (not the card's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (log,) = Path(folder).glob("events.out.tfevents.*")
    events = EventAccumulator(str(log))
    events.Reload()
    return events


def test_the_model_card_lists_what_the_runs_record_and_logs_hold(pretraining_run, tmp_path):
    """The card of the shared pretraining run's export: the architecture and windows from the file's record, the
    normalisation from its input record, the recipe from the run's config.yaml, and the number of training images
    as the run's TensorBoard logs hold it (read here with TensorBoard's reader on its own). The run stops before
    its first validation, so its logs hold no metric, and the card says so (runs with metrics: the tests below)."""
    _export(pretraining_run.checkpoint, tmp_path / "hf", kind="mim")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-to-image\n")
    events = _logged(pretraining_run.folder)
    images = int(events.Scalars("data/train_images")[-1].value)
    assert images == len(pretraining_run.cli.datamodule.train_files) > 0
    assert f"({images} training images)" in card and "val/loss" not in events.Tags()["scalars"]
    assert "No metrics were found in the run's logs" in card
    assert "Windows per stage: [4, 4]" in card and "| `data.mask_ratio` | 0.5 |" in card
    assert "| `model.encoder_kwargs` | {embed\\_dim: 24, depths: \\[2, 2\\], num\\_heads: \\[2, 4\\]} |" in card
    assert f"with mean {list(RUN_MEAN)} and std {list(RUN_STD)}" in card
    assert f"python -m simmim.pretrain --config {pretraining_run.folder / 'config.yaml'}" in card

    export([str(pretraining_run.export), "--to", "timm", str(tmp_path / "encoder_timm.safetensors")])
    sidecar = (tmp_path / "encoder_timm.md").read_text()
    assert "exported as timm (encoder\\_timm.safetensors)" in sidecar
    assert f"({images} training images)" in sidecar


def test_a_fine_tuning_runs_card_lists_its_logged_accuracy_and_both_recipes(pretraining_run, digits32, tmp_path):
    """A short fine-tuning run from the shared pretraining export, with its TensorBoard logs: the card lists the
    last `val/acc1` the logs hold (read here on their own), the fine-tuning recipe and, from the pretrained file's
    run folder, the pretraining recipe."""
    from simmim.finetune import main as finetune

    encoder = "{embed_dim: 24, depths: [2, 2], num_heads: [2, 4]}"
    cli = finetune(["fit", "--data.root", digits32, "--data.img_size", "32", "--data.batch_size", "16",
                    "--data.num_workers", "0", "--model.encoder_kwargs", encoder, "--model.window_size", "4",
                    "--model.pretrained", str(pretraining_run.export), "--trainer.max_epochs", "1",
                    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
                    "--trainer.val_check_interval", "2",
                    "--trainer.precision", "32", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(tmp_path / "run")])  # fmt: skip
    logged = _logged(cli.trainer.log_dir).Scalars("val/acc1")[-1]
    classifier = Path(cli.trainer.log_dir) / "classifier.safetensors"
    _export(classifier, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"| val/acc1 | {logged.value:.4f} | {logged.step} |" in card and "Trained by fine-tuning" in card
    assert f"({len(cli.datamodule.train_files)} training images)" in card and "10 classes: 0, 1, 2" in card
    assert "It started from" in card and "(pretraining)" in card and "| `data.mask_ratio` | 0.5 |" in card
    assert f"python -m simmim.finetune fit --config {Path(cli.trainer.log_dir) / 'config.yaml'}" in card


def test_a_pretraining_runs_card_lists_its_logged_loss_and_knn_accuracy(digits32, tmp_path):
    """A short pretraining run with the default recipe's monitors on (validation, the kNN monitor on the digits'
    labels): its card lists the last `val/loss` and `val/knn_acc1` the run's logs hold, read here on their own."""
    from simmim.pretrain import main as pretrain

    encoder = "{embed_dim: 24, depths: [2, 2], num_heads: [2, 4]}"
    cli = pretrain(["--data.root", digits32, "--data.img_size", "32", "--data.mask_patch_size", "8",
                    "--data.batch_size", "16", "--data.num_workers", "0", "--model.encoder_kwargs", encoder,
                    "--model.window_size", "4", "--model.knn_root", digits32, "--model.knn_every_n_epochs", "1",
                    "--model.finetune_every_n_epochs", "0", "--trainer.max_epochs", "1",
                    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.precision", "32", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(tmp_path / "run")])  # fmt: skip
    folder = Path(cli.trainer.log_dir)
    events = _logged(folder)
    _export(folder / "encoder.safetensors", tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    for tag in ("val/loss", "val/knn_acc1"):
        logged = events.Scalars(tag)[-1]
        assert f"| {tag} | {logged.value:.4f} | {logged.step} |" in card, tag


def test_a_crafted_run_config_cannot_blow_up_or_rewrite_the_card(pretraining_run, tmp_path):
    """The run's config.yaml is untrusted: a YAML alias bomb (a few hundred bytes standing for gigabytes) is not
    read, and a line break in a value cannot add lines to the card."""
    import shutil

    from simmim.eval.card import model_card
    from simmim.eval.export import read_weights

    run = tmp_path / "run"
    shutil.copytree(pretraining_run.folder, run)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9)
    )
    (run / "config.yaml").write_text(bomb + "data:\n  root: *j\n")
    card = model_card(read_weights(str(run / "encoder.safetensors")), "a test")
    assert "(no options recorded)" in card  # the config is not read: it holds aliases
    (run / "config.yaml").write_text('data:\n  root: "/data\\n# Injected heading\\n"\n')
    card = model_card(read_weights(str(run / "encoder.safetensors")), "a test")
    assert "\n# Injected" not in card and "/data \\# Injected heading" in card


def test_a_malformed_label_record_is_refused_in_one_line():
    from swinv2.reading import MalformedRecordError

    for record in ("[[1], [2]]", '["a", "a"]', '["a", ""]', "[1, 2"):
        with pytest.raises(MalformedRecordError, match="label record"):
            swinv2.read_labels({"labels": record})
