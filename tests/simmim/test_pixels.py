"""Images of any channel count and bit depth (`simmim.data.pixels`): the readers (multi-band tiled and compressed
GeoTIFF, `.npy`, 16-bit PNG), a run's pixel format and what it refuses, crafted files, the per-channel statistics of
`--model.mean auto`, the crop and flip of any channel count, and pretraining through the command line on 13-band
16-bit GeoTIFF tiles, 16-bit grayscale PNGs and float `.npy` arrays."""

import io
import os
import re
import zlib

import cv2
import numpy as np
import pytest
import tifffile
import torch

import swinv2
from simmim.data.images import UnreadableImageError, decode_image, normalize_images, read_image_file
from simmim.data.pixels import (
    RGB8,
    PixelFormat,
    PixelFormatError,
    channel_statistics,
    decode_pixels,
    infer_format,
    read_array,
)
from simmim.errors import ConfigError, DataFolderError
from simmim.finetune.augment import GeometricTransform
from simmim.pretrain.augment import PretrainTransform

BAND_MEAN = np.linspace(2000, 14000, 13)  # uint16 values per band
BAND_STD = np.linspace(300, 1500, 13)


def _bands(rng, size=40, mean=BAND_MEAN, std=BAND_STD):
    """(bands, size, size) uint16, each band normal(mean, std)."""
    return rng.normal(mean[:, None, None], std[:, None, None], (len(mean), size, size)).round().astype(np.uint16)


def _geotiffs(folder, n, size=40, seed=0):
    """n 13-band 16-bit tiles as Sentinel-2 tiles are stored: bands planar, tiled, deflate-compressed."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        tifffile.imwrite(folder / f"tile_{i:02d}.tif", _bands(rng, size), photometric="minisblack",
                         planarconfig="separate", tile=(16, 16), compression="zlib")  # fmt: skip
    return folder


def _tiff_bytes(array, **kwargs) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, array, **kwargs)
    return out.getvalue()


def _read(path):
    return read_array(read_image_file(path), path)


def test_a_multi_band_16_bit_geotiff_reads_band_for_band_at_its_precision(tmp_path):
    bands = _bands(np.random.default_rng(1))
    tifffile.imwrite(tmp_path / "planar.tif", bands, planarconfig="separate", tile=(16, 16), compression="zlib")
    tifffile.imwrite(tmp_path / "contig.tif", bands.transpose(1, 2, 0), planarconfig="contig", photometric="minisblack")
    for name in ("planar.tif", "contig.tif"):
        img, bgr = _read(tmp_path / name)
        assert not bgr and img.dtype == np.uint16 and img.shape == (40, 40, 13)
        np.testing.assert_array_equal(img, bands.transpose(1, 2, 0))
        assert infer_format(img, bgr) == PixelFormat(13, "uint16")
        np.testing.assert_array_equal(decode_pixels(read_image_file(tmp_path / name), name, PixelFormat(13, "uint16")),
                                      bands.transpose(1, 2, 0))  # fmt: skip


def test_npy_arrays_and_16_bit_grayscale_pngs_keep_their_values(tmp_path):
    rng = np.random.default_rng(2)
    plane = rng.normal(0.0, 3.0, (20, 24)).astype(np.float32)  # raw float values, negative ones too
    np.save(tmp_path / "plane.npy", plane)
    cube = rng.integers(0, 60000, (20, 24, 5), dtype=np.uint16)
    np.save(tmp_path / "cube.npy", cube)
    gray = rng.integers(0, 65535, (20, 24), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "gray16.png"), gray)
    img, bgr = _read(tmp_path / "plane.npy")
    assert infer_format(img, bgr) == PixelFormat(1, "float32")
    decoded = decode_pixels(read_image_file(tmp_path / "plane.npy"), "p", PixelFormat(1, "float32"))
    np.testing.assert_array_equal(decoded[:, :, 0], plane)
    img, bgr = _read(tmp_path / "cube.npy")
    assert infer_format(img, bgr) == PixelFormat(5, "uint16")
    np.testing.assert_array_equal(img, cube)
    img, bgr = _read(tmp_path / "gray16.png")
    assert infer_format(img, bgr) == PixelFormat(1, "uint16")
    np.testing.assert_array_equal(img[:, :, 0], gray)


def test_8_bit_rgb_reads_as_it_always_did_and_enters_wider_formats_exactly(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), rgb[:, :, ::-1])
    data = read_image_file(tmp_path / "c.png")
    assert infer_format(*read_array(data, "c")) == RGB8
    np.testing.assert_array_equal(decode_pixels(data, "c", RGB8), decode_image(tmp_path / "c.png"))
    np.testing.assert_array_equal(decode_pixels(data, "c", RGB8), rgb)
    wide = decode_pixels(data, "c", PixelFormat(3, "uint16"))
    assert wide.dtype == np.uint16 and (wide == rgb.astype(np.uint16) * 257).all()  # the same fraction of the range
    np.testing.assert_allclose(decode_pixels(data, "c", PixelFormat(3, "float32")), rgb / 255.0, atol=1e-7)
    gray = decode_pixels(data, "c", PixelFormat(3, "uint8"))
    assert gray.shape == (10, 12, 3)


def test_a_file_the_run_cannot_carry_without_loss_is_refused_by_name_with_the_fix(tmp_path):
    rng = np.random.default_rng(4)
    cv2.imwrite(str(tmp_path / "deep.png"), rng.integers(0, 65535, (8, 8), dtype=np.uint16))
    np.save(tmp_path / "float.npy", rng.random((8, 8, 13), dtype=np.float32))
    four = rng.integers(0, 9, (4, 8, 8), dtype=np.uint16)  # R, G, B and near infrared: four bands, not RGBA
    tifffile.imwrite(tmp_path / "four.tif", four, planarconfig="separate", photometric="minisblack")
    cases = [
        ("deep.png", RGB8, "holds 16-bit pixels, this run 8-bit ones: set --data.depth uint16"),
        ("float.npy", PixelFormat(13, "uint16"), "holds float32 pixels, this run uint16: set --data.depth float32"),
        ("four.tif", PixelFormat(13, "uint16"), "has 4 channel.s., this run 13: set --data.channels"),
    ]
    for name, fmt, message in cases:
        with pytest.raises(PixelFormatError, match=f"{name} {message}"):
            decode_pixels(read_image_file(tmp_path / name), tmp_path / name, fmt)
    assert issubclass(PixelFormatError, UnreadableImageError)  # passed over and counted as any unreadable image


def test_crafted_arrays_and_tiffs_are_refused_before_they_run_code_or_allocate(tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # an object array: a pickle inside
    huge = io.BytesIO()
    np.lib.format.write_array_header_1_0(huge, {"descr": "<f4", "fortran_order": False, "shape": (200000, 200000)})
    lying = bytearray(_tiff_bytes(np.zeros((4, 4), np.uint16)))  # a 4 x 4 image whose tags claim 65535 x 65535
    with tifffile.TiffFile(io.BytesIO(bytes(lying))) as tif:
        offsets = [tif.pages[0].tags[name].valueoffset for name in ("ImageWidth", "ImageLength")]
    for offset in offsets:
        lying[offset : offset + 4] = (65535).to_bytes(4, "little")
    cases = ((buffer.getvalue(), "not object"), (huge.getvalue(), "more than"), (bytes(lying), "more than|cannot"))
    for data, message in cases:
        with pytest.raises(UnreadableImageError, match=message):
            decode_pixels(np.frombuffer(data, np.uint8), "crafted", PixelFormat(1, "float32"))


def test_the_statistics_of_a_set_with_known_band_means_and_stds_come_within_one_percent(tmp_path):
    files = sorted(_geotiffs(tmp_path / "tiles", 12, size=64).iterdir())
    mean, std = channel_statistics(files, PixelFormat(13, "uint16"), count=12)
    np.testing.assert_allclose(np.array(mean) * 65535, BAND_MEAN, rtol=0.01)
    np.testing.assert_allclose(np.array(std) * 65535, BAND_STD, rtol=0.01)
    with pytest.raises(ValueError, match=r"channel\(s\) \[0\] hold one value"):
        np.save(tmp_path / "flat.npy", np.ones((8, 8), np.float32))
        channel_statistics([tmp_path / "flat.npy"], PixelFormat(1, "float32"))


def test_the_crop_and_flip_of_any_channel_count_are_the_rgb_ones_band_for_band():
    """A 13-band image and its 3-band slices, with the same generator: the same crop, resize and flip."""
    bands = _bands(np.random.default_rng(5), size=48).transpose(1, 2, 0).copy()  # (48, 48, 13) uint16
    transform = PretrainTransform(32, train=True)
    for seed in range(4):
        out = transform(bands, np.random.default_rng(seed))
        assert out.dtype == torch.uint16 and out.shape == (13, 32, 32)
        for first in (0, 3, 6, 9):
            rgb = transform(np.ascontiguousarray(bands[:, :, first : first + 3]), np.random.default_rng(seed))
            # OpenCV's vector paths for 3 and 13 channels may round a pixel apart: 1 of 65535 at most
            assert (out[first : first + 3].int() - rgb.int()).abs().max() <= 1, (seed, first)
        one = transform(np.ascontiguousarray(bands[:, :, :1]), np.random.default_rng(seed))
        assert one.shape == (1, 32, 32) and (one.int() - out[:1].int()).abs().max() <= 1
    plane = np.random.default_rng(6).normal(5.0, 2.0, (40, 40, 1)).astype(np.float32)
    normed = PretrainTransform(32, train=False, normalize=([5.0], [2.0]))(plane, np.random.default_rng(0))
    expected = (cv2.resize(plane, (32, 32), interpolation=cv2.INTER_LINEAR) - 5.0) / 2.0  # float pixels: here
    assert normed.dtype == torch.float32 and torch.allclose(normed[0], torch.from_numpy(expected), atol=1e-6)


@pytest.mark.parametrize("depth", ["uint16", "float32"])
def test_images_of_more_bands_than_opencv_takes_in_one_call_crop_resize_and_flip_band_for_band(depth):
    """OpenCV's functions take at most 128 channels: a 200-band (hyperspectral) image goes through them in groups,
    for training and evaluation, both stages' transforms, and comes out as its 3-band slices do."""
    bands = np.random.default_rng(7).integers(0, 60000, (40, 48, 200)).astype(depth)
    pre = PretrainTransform(24, train=True)
    for seed in range(4):
        out = pre.geometry(bands, np.random.default_rng(seed))
        assert out.shape == (24, 24, 200) and out.dtype == bands.dtype
        for first in (0, 126, 197):  # a group's first bands, across the groups' border, the last ones
            part = pre.geometry(np.ascontiguousarray(bands[:, :, first : first + 3]), np.random.default_rng(seed))
            assert np.abs(out[:, :, first : first + 3].astype(np.float64) - part).max() <= 1, (seed, first)
    for train in (True, False):  # fine-tuning's geometry: bicubic
        np.random.seed(0)
        x = GeometricTransform(24, train, [0.0] * 200, [1.0] * 200, 1.0, 0.0)(bands.astype(np.float32))
        np.random.seed(0)
        part = GeometricTransform(24, train, [0.0] * 3, [1.0] * 3, 1.0, 0.0)(bands[:, :, 130:133].astype(np.float32))
        assert x.shape == (200, 24, 24) and torch.allclose(x[130:133], part, rtol=0, atol=0.5), train


def test_16_bit_batches_are_normalised_on_the_device_as_fractions_of_their_range():
    x = torch.randint(0, 65535, (2, 13, 8, 8)).to(torch.uint16)
    mean, std = torch.linspace(0.1, 0.3, 13), torch.linspace(0.05, 0.1, 13)
    out = normalize_images(x, mean.tolist(), std.tolist())
    expected = (x.float() / 65535 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="13 channel.s., a normalisation of 3"):
        normalize_images(x, [0.5] * 3, [0.2] * 3)


TINY = [
    "--data.img_size", "32", "--data.mask_patch_size", "8", "--data.batch_size", "4", "--data.num_workers", "0",
    "--data.val_fraction", "0.25", "--model.encoder_kwargs", '{"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}',
    "--model.window_size", "4", "--model.knn_every_n_epochs", "0", "--trainer.max_epochs", "1",
    "--trainer.precision", "32", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip


def _pretrain(root, tmp_path, *extra):
    from simmim.pretrain import main as pretrain

    cli = pretrain(["--data.root", str(root), *TINY, "--data.index_cache", str(tmp_path / "cache"),
                    "--trainer.default_root_dir", str(tmp_path / "run"), *extra])  # fmt: skip
    version = tmp_path / "run" / "logs" / "version_0"
    raw = swinv2.read_checkpoint(version / "encoder.safetensors")
    return cli, swinv2.create_model_from_checkpoint(version / "encoder.safetensors"), swinv2.read_inputs(raw), version


def test_13_band_16_bit_geotiff_tiles_pretrain_through_the_command_line(tmp_path, capsys):
    """No channel or normalisation option: the channels and the depth come from the first tile, the mean and std
    from the training tiles (within 1% of the bands' own); the export records them; the grid shows bands 4, 3, 2."""
    root = _geotiffs(tmp_path / "tiles", 16, size=64)
    cli, model, inputs, version = _pretrain(root, tmp_path, "--grid.bands", "[4, 3, 2]")
    assert cli.datamodule.pixels == PixelFormat(13, "uint16") and model.in_chans == 13
    assert inputs["depth"] == "uint16"
    np.testing.assert_allclose(np.array(inputs["mean"]) * 65535, BAND_MEAN, rtol=0.01)
    np.testing.assert_allclose(np.array(inputs["std"]) * 65535, BAND_STD, rtol=0.01)
    assert inputs["mean"] == list(cli.model.mean) == cli.model.hparams.mean
    assert np.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    grid = cv2.imread(str(version / "reconstructions" / "final.png"))
    assert grid is not None and grid.std() > 5  # stretched, not a flat field
    assert "data statistics (12 training images)" in capsys.readouterr().out
    # a second run reads them back from the cache, beside the index
    _, _, second, _ = _pretrain(root, tmp_path / "again", "--data.index_cache", str(tmp_path / "cache"))
    assert second == inputs and "data statistics" not in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["png16", "npy"])
def test_one_channel_16_bit_pngs_and_float_arrays_pretrain_through_the_command_line(tmp_path, kind):
    rng = np.random.default_rng(7)
    (tmp_path / "data").mkdir()
    for i in range(12):
        if kind == "png16":
            cv2.imwrite(str(tmp_path / "data" / f"{i}.png"), rng.integers(1000, 30000, (40, 40), dtype=np.uint16))
        else:
            np.save(tmp_path / "data" / f"{i}.npy", rng.normal(-3.0, 0.5, (40, 40)).astype(np.float32))
    cli, model, inputs, _ = _pretrain(tmp_path / "data", tmp_path)
    depth = "uint16" if kind == "png16" else "float32"
    assert model.in_chans == 1 and inputs["depth"] == depth and cli.datamodule.pixels == PixelFormat(1, depth)
    if kind == "npy":  # raw float values: their own mean and std
        assert inputs["mean"][0] == pytest.approx(-3.0, abs=0.05) and inputs["std"][0] == pytest.approx(0.5, rel=0.05)
    assert np.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


FINE = [
    "--data.img_size", "32", "--data.batch_size", "4", "--data.num_workers", "0", "--data.val_fraction", "0.25",
    "--model.arch", "swinv2_tiny", "--model.encoder_kwargs", '{"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}',
    "--model.window_size", "4", "--trainer.max_epochs", "1", "--trainer.precision", "32",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.check_val_every_n_epoch", "1", "--trainer.val_check_interval", "1.0",
]  # fmt: skip


def _labelled_geotiffs(root):
    """Two classes of 8 tiles each, class b's bands brighter."""
    for cls, shift in (("a", 0), ("b", 3000)):
        _geotiffs(root / cls, 8, size=40, seed=shift)
        for path in (root / cls).iterdir():
            tifffile.imwrite(path, tifffile.imread(path) + np.uint16(shift), planarconfig="separate")
    return root


def _finetune(root, tmp_path, *extra):
    from simmim.finetune import main as finetune

    cli = finetune(["--data.root", str(root), *FINE, "--data.index_cache", str(tmp_path / "cache"),
                    "--trainer.default_root_dir", str(tmp_path / "fine"), *extra])  # fmt: skip
    exported = tmp_path / "fine" / "logs" / "version_0" / "classifier.safetensors"
    return cli, exported


def test_200_band_images_flow_through_both_stages_the_probe_and_the_viewer(tmp_path, capsys):
    """More bands than OpenCV takes in one call (128): hyperspectral cubes as 16-bit arrays, in two classes, larger
    than the model's input (the probe and the viewer resize them). Their statistics print in one short line."""
    rng = np.random.default_rng(8)
    root = tmp_path / "cubes"
    for cls, shift in (("a", 0), ("b", 2000)):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            np.save(
                root / cls / f"{i}.npy", rng.integers(100, 4000, (40, 40, 200)).astype(np.uint16) + np.uint16(shift)
            )
    cli, model, inputs, version = _pretrain(root, tmp_path / "pre", "--grid.bands", "[150, 100, 50]")
    assert model.in_chans == 200 and len(inputs["mean"]) == 200 and cli.datamodule.pixels == PixelFormat(200, "uint16")
    assert np.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data statistics"))
    assert "(200 channels)" in line and len(line) < 400, line
    fine, exported = _finetune(root, tmp_path, "--model.pretrained", str(version / "encoder.safetensors"))
    assert fine.model.model.in_chans == 200 and "val/acc1" in fine.trainer.callback_metrics
    from simmim.probe import main as probe
    from simmim.reconstruct import main as reconstruct

    assert 0 <= probe(["--checkpoint", str(version / "encoder.safetensors"), "--data.root", str(root), "--epochs", "2"])
    grid = reconstruct(["--checkpoint", str(version / "checkpoints" / "last.ckpt"), "--images", str(root),
                        "--out", str(tmp_path / "grid.png"), "--num_images", "2", "--bands", "150,100,50"])  # fmt: skip
    assert grid.shape[0] == 3 and float(grid.std()) > 0.05


def test_fine_tuning_takes_a_13_band_export_with_its_format_and_normalisation_and_no_channel_option(tmp_path, caplog):
    root = _labelled_geotiffs(tmp_path / "tiles")
    _, _, inputs, version = _pretrain(root, tmp_path / "pre")
    cli, exported = _finetune(root, tmp_path, "--model.pretrained", str(version / "encoder.safetensors"))
    assert cli.datamodule.pixels == PixelFormat(13, "uint16") and cli.model.model.in_chans == 13
    assert list(cli.model.mean) == inputs["mean"] and list(cli.datamodule.std) == inputs["std"]  # the record's
    assert "take the geometric augmentation instead: random resized crop, flip, random erasing" in caplog.text
    raw = swinv2.read_checkpoint(exported)
    assert swinv2.create_model_from_checkpoint(exported).in_chans == 13 and swinv2.read_inputs(raw) == inputs
    assert "val/acc1" in cli.trainer.callback_metrics
    # the probe and the viewer read the same record: no channel or normalisation option either
    from simmim.eval.classify import checkpoint_inputs
    from simmim.probe import main as probe
    from simmim.reconstruct import main as reconstruct

    export = version / "encoder.safetensors"
    assert checkpoint_inputs(str(export), 13) == (PixelFormat(13, "uint16"), inputs["mean"], inputs["std"])
    assert 0 <= probe(["--checkpoint", str(export), "--data.root", str(root), "--epochs", "5"]) <= 100
    grid = reconstruct(["--checkpoint", str(version / "checkpoints" / "last.ckpt"), "--images", str(root),
                        "--out", str(tmp_path / "grid.png"), "--num_images", "2", "--bands", "4,3,2"])  # fmt: skip
    assert grid.shape == (3, 2 * 34 + 2, 4 * 34 + 2) and float(grid.std()) > 0.05  # stretched bands
    with pytest.raises(ConfigError, match="--bands .4, 3.: must be one or three band numbers in 1..13"):
        reconstruct(["--checkpoint", str(version / "checkpoints" / "last.ckpt"), "--images", str(root),
                     "--out", str(tmp_path / "grid.png"), "--bands", "4,3"])  # fmt: skip


def test_rgb_weights_go_into_a_13_band_model_only_when_adaptation_is_asked_for(tmp_path):
    root = _labelled_geotiffs(tmp_path / "tiles")
    rgb = swinv2.create_model("swinv2_tiny", img_size=32, window_size=4, embed_dim=24, depths=[2, 2], num_heads=[2, 4])
    swinv2.save_weights(tmp_path / "rgb.safetensors", rgb)  # an RGB file without an input record (as timm's)
    with pytest.raises(SystemExit, match="in_chans|channel"):
        _finetune(root, tmp_path / "refused", "--model.pretrained", str(tmp_path / "rgb.safetensors"))
    cli, exported = _finetune(root, tmp_path, "--model.pretrained", str(tmp_path / "rgb.safetensors"),
                              "--model.adapt_channels", "true")  # fmt: skip
    assert cli.model.model.in_chans == 13 and cli.model.hparams.adapt_channels  # opt-in, and recorded
    stem = cli.model.model.patch_embed.proj.weight.detach()
    assert stem.shape[1] == 13  # the RGB stem spread over 13 bands (swinv2.adapt_in_chans)
    assert swinv2.read_inputs(swinv2.read_checkpoint(exported))["depth"] == "uint16"


def test_tiffs_that_are_not_bands_read_through_opencv_as_they_always_did(tmp_path):
    """Palette, RGBA and multi-page TIFFs (and LZW, OpenCV's own TIFF output) in an 8-bit RGB run: exactly the old
    decode; a 4-sample MINISBLACK TIFF is four bands, not RGBA."""
    rng = np.random.default_rng(8)
    rgb = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "palette.tif", rng.integers(0, 4, (12, 10), dtype=np.uint8), photometric="palette",
                     colormap=rng.integers(0, 65535, (3, 256), dtype=np.uint16))  # fmt: skip
    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([rgb, rng.integers(0, 255, (12, 10), dtype=np.uint8)]))
    tifffile.imwrite(
        tmp_path / "pages.tif", rng.integers(0, 255, (3, 12, 10), dtype=np.uint8), photometric="minisblack"
    )
    cv2.imwrite(str(tmp_path / "lzw.tif"), rgb)
    for name in ("palette.tif", "rgba.tif", "pages.tif", "lzw.tif"):
        data = read_image_file(tmp_path / name)
        assert infer_format(*read_array(data, name)) == RGB8, name
        np.testing.assert_array_equal(decode_pixels(data, name, RGB8), decode_image(tmp_path / name), err_msg=name)
    four = rng.integers(0, 60000, (12, 10, 4), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgbn.tif", four, photometric="minisblack", planarconfig="contig")
    img, bgr = _read(tmp_path / "rgbn.tif")
    assert infer_format(img, bgr) == PixelFormat(4, "uint16")
    np.testing.assert_array_equal(img, four)


def test_a_deflate_bomb_in_a_band_tiff_stops_at_the_segment_size(tmp_path):
    """A 13-band 8 x 8 TIFF whose first strip inflates to 64 MB: refused after inflating its 128 bytes."""
    data = bytearray(_tiff_bytes(np.zeros((13, 8, 8), np.uint16), planarconfig="separate",
                                 photometric="minisblack", compression="zlib"))  # fmt: skip
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tags = tif.pages[0].tags
        offsets, counts = tags["StripOffsets"], tags["StripByteCounts"]
        width = {3: 2, 4: 4, 16: 8}[offsets.dtype]
    bomb = zlib.compress(bytes(64 << 20), 9)
    start = len(data)
    data += bomb
    data[offsets.valueoffset : offsets.valueoffset + width] = start.to_bytes(width, "little")
    data[counts.valueoffset : counts.valueoffset + width] = len(bomb).to_bytes(width, "little")
    with pytest.raises(UnreadableImageError, match="inflates past its 128 bytes"):
        decode_pixels(np.frombuffer(bytes(data), np.uint8), "bomb.tif", PixelFormat(13, "uint16"))


def test_arrays_of_other_layouts_and_types_are_refused_or_converted_by_rule(tmp_path):
    rng = np.random.default_rng(9)
    cases = {
        "band_first.npy": (rng.random((13, 16, 16), dtype=np.float32), "look band-first"),
        "nan.npy": (np.full((8, 8), np.nan, np.float32), "NaN or infinite"),
        **{  # one bad pixel among finite ones, in each float type a file may hold
            f"one_{bad}_{dtype.__name__}.npy": (
                np.where(np.eye(8, dtype=bool), bad, 1.0).astype(dtype),
                "NaN or infinite",
            )
            for bad in (np.nan, np.inf, -np.inf)
            for dtype in (np.float16, np.float32, np.float64)
        },
        "int32.npy": (np.zeros((8, 8), np.int32), "its pixels are int32"),
        "complex.npy": (np.zeros((8, 8), np.complex64), "a .npy image is an"),
    }
    for name, (array, message) in cases.items():
        np.save(tmp_path / name, array)
        with pytest.raises(UnreadableImageError, match=message):
            decode_pixels(read_image_file(tmp_path / name), name, PixelFormat(1, "float32"))
    np.save(tmp_path / "dem.npy", np.array([[-400, 8848]], np.int16).repeat(4, 0).repeat(2, 1))
    dem = decode_pixels(read_image_file(tmp_path / "dem.npy"), "dem", PixelFormat(1, "float32"))
    assert dem.dtype == np.float32 and dem.min() == -400 and dem.max() == 8848  # signed integers: their values


def test_the_statistics_cache_tells_roots_and_rewritten_files_apart(tmp_path, capsys):
    """Two roots with the same file names and other pixels share an index cache: each gets its own statistics;
    a tile rewritten in place is read again."""
    first, second = _geotiffs(tmp_path / "one" / "tiles", 8), _geotiffs(tmp_path / "two" / "tiles", 8, seed=5)
    for path in second.iterdir():  # brighter bands, the same names
        tifffile.imwrite(path, tifffile.imread(path) + np.uint16(5000), planarconfig="separate")
    runs = [_pretrain(root, tmp_path / name, "--data.index_cache", str(tmp_path / "cache"))[2]
            for name, root in (("a", first), ("b", second))]  # fmt: skip
    assert runs[0]["mean"] != runs[1]["mean"]
    assert capsys.readouterr().out.count("data statistics") == 2


def test_a_resume_keeps_its_checkpoints_normalisation_and_refuses_other_pixels(tmp_path):
    """`--ckpt_path last` takes the checkpoint's hyper-parameters (resolved values, not "auto") over the command
    line's, as LightningCLI does; a resume whose pixels are of another type than the checkpoint's is refused."""
    from simmim.pretrain import main as pretrain

    root = _geotiffs(tmp_path / "tiles", 8)
    _, _, inputs, version = _pretrain(root, tmp_path)
    resume = ["--data.root", str(root), *TINY, "--data.index_cache", str(tmp_path / "cache"), "--trainer.max_epochs",
              "2", "--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", "last"]  # fmt: skip
    with pytest.raises(SystemExit, match="the checkpoint was trained on uint16 pixels normalised with mean"):
        pretrain([*resume, "--data.depth", "float32"])
    cli = pretrain([*resume, "--model.mean", str([m * 1.1 for m in inputs["mean"]])])
    assert cli.trainer.current_epoch == 2 and list(cli.model.mean) == inputs["mean"]
    assert list(cli.datamodule.mean) == inputs["mean"]  # the loaders' too


def test_options_that_do_not_fit_the_images_are_refused_at_the_start(tmp_path):
    root = _geotiffs(tmp_path / "tiles", 8)
    with pytest.raises(SystemExit, match=r"--grid.bands \[14, 3, 2\]: must be one or three band numbers in 1..13"):
        _pretrain(root, tmp_path / "bands", "--grid.bands", "[14, 3, 2]")


def test_images_that_disagree_on_their_format_stop_the_run_at_the_start_naming_two(tmp_path):
    """Where the format is not given, the first 16 decodable images must agree: a 4-band tile among 13-band ones
    stops the run at the start, naming one file of each; 8-bit and 16-bit images together make a 16-bit run; with
    the option given, the start goes on. The statistics' draw then stops on a file of another format, naming it,
    rather than passing it over as training does."""
    from simmim.data.pixel_source import agreed_format
    from simmim.pretrain.data import PretrainDataModule

    root = _geotiffs(tmp_path / "tiles", 6)
    rng = np.random.default_rng(1)
    four = _bands(rng, mean=BAND_MEAN[:4], std=BAND_STD[:4])
    tifffile.imwrite(root / "tile_03b.tif", four, photometric="minisblack", planarconfig="separate")
    with pytest.raises(
        DataFolderError, match=r"disagree on their channel counts: .*tile_00.tif has 13, .*tile_03b.tif has 4; "
    ):
        PretrainDataModule(str(root), img_size=32, mask_patch_size=8, index_cache=str(tmp_path / "cache"))
    given = PretrainDataModule(str(root), img_size=32, mask_patch_size=8, channels=13, index_cache=str(tmp_path / "c"))
    assert given.pixels == PixelFormat(13, "uint16")
    with pytest.raises(PixelFormatError, match=r"drawn for the statistics does not fit .*tile_03b.tif has 4 channel"):
        channel_statistics(given.file_index(), given.pixels, 100)

    def start(folder):  # the format a pretraining run over `folder` takes
        return PretrainDataModule(str(folder), img_size=32, mask_patch_size=8, index_cache=str(tmp_path / "c")).pixels

    gray = tmp_path / "gray"  # 8-bit and 16-bit grayscale PNGs, as a medical set mixes them: one 16-bit channel
    gray.mkdir()
    cv2.imwrite(str(gray / "a.png"), rng.integers(0, 255, (40, 40), dtype=np.uint8))
    cv2.imwrite(str(gray / "b.png"), rng.integers(0, 65535, (40, 40), dtype=np.uint16))
    assert start(gray) == PixelFormat(1, "uint16")
    cv2.imwrite(str(gray / "c.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    with pytest.raises(DataFolderError, match=r"disagree on their channel counts: .*a.png has 1, .*c.png has 3"):
        start(gray)
    (gray / "b.png").unlink()
    assert start(gray) == RGB8  # 8-bit gray among 8-bit colour: RGB, as ever

    a, b, c = PixelFormat(3, "uint8"), PixelFormat(3, "uint16"), PixelFormat(3, "float32")
    assert agreed_format("r", [(a, "a.png", False), (b, "b.png", False)], None, None) == b  # 8 bits enter 16 exactly
    with pytest.raises(DataFolderError, match=r"disagree on their pixel types: b.png has uint16, c.npy has float32"):
        agreed_format("r", [(b, "b.png", False), (c, "c.npy", False), (a, "a.png", False)], None, None)
    assert agreed_format("r", [(b, "b.png", False), (c, "c.npy", False)], None, "float32") == c


def _as_two_ranks(roots, tmp_path, *extra):
    """`python -m simmim.pretrain` as the two ranks of one DDP run over gloo, started as a cluster starts them (each
    told its rank by LOCAL_RANK), rank r reading `roots[r]`; (exit code, stderr) of each."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    runs = []
    try:
        for rank, root in enumerate(roots):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                   "NODE_RANK": "0", "LOCAL_RANK": str(rank)}  # fmt: skip
            cmd = [sys.executable, "-m", "simmim.pretrain", "--data.root", str(root), *TINY, "--data.index_cache",
                   str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / f"run{rank}"),
                   "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
                   "--trainer.logger", "false", *extra]  # fmt: skip
            runs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        errs = [run.communicate(timeout=240)[1] for run in runs]
        return [(run.returncode, err) for run, err in zip(runs, errs)]
    finally:
        for run in runs:
            run.kill()
            run.wait()


def test_two_ranks_that_read_other_formats_or_whose_statistics_fail_stop_together_with_the_reason(tmp_path):
    """Two processes of one DDP run. Ranks whose images are of other formats (4-band uint16 and 2-band float32 arrays
    under the same names) both stop at the start, saying so. Ranks that agree on the first 16 images, but where the
    statistics' draw on rank 0 meets a file of another channel count (its 20th), both stop with rank 0's reason:
    rank 1, which works out no statistics, receives it."""
    from simmim.data.index import open_index

    def arrays(folder, channels, dtype, n=8, odd=None):
        folder.mkdir()
        rng = np.random.default_rng(channels)
        for i in range(n):
            np.save(
                folder / f"{i:02d}.npy",
                rng.uniform(0, 1000, (16, 16, odd if i == n - 1 and odd else channels)).astype(dtype),
            )
        open_index(folder, None, tmp_path / "cache")  # rank 1's node index (rank 0 builds its own at start)
        return folder

    runs = _as_two_ranks([arrays(tmp_path / "a", 4, np.uint16), arrays(tmp_path / "b", 2, np.float32)], tmp_path)
    for rank, (code, err) in enumerate(runs):
        assert code != 0 and "the ranks read different pixel formats from their first images" in err, (
            rank,
            err[-2000:],
        )
    assert "this rank: 4 channel(s), uint16" in runs[0][1] and "this rank: 2 channel(s), float32" in runs[1][1]

    roots = [arrays(tmp_path / "c", 2, np.float32, n=20, odd=3), arrays(tmp_path / "d", 2, np.float32, n=20)]
    runs = _as_two_ranks(roots, tmp_path, "--data.val_fraction", "0")  # every file a training file, drawn
    reason = r"--model.mean/--model.std auto: an image drawn for the statistics does not fit .*19.npy has 3 channel"
    for rank, (code, err) in enumerate(runs):
        assert code != 0 and re.search(reason, err), (rank, err[-2000:])


def test_8_bit_rgb_keeps_imagenet_values_for_what_is_not_given_and_reads_no_statistics(tmp_path, capsys):
    from simmim.data.loaders import IMAGENET_STD
    from simmim.pretrain.data import PretrainDataModule

    folder = tmp_path / "rgb"
    folder.mkdir()
    for i in range(6):
        cv2.imwrite(str(folder / f"{i}.png"), np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    dm = PretrainDataModule(str(folder), img_size=32, mask_patch_size=8, mean=[0.5, 0.4, 0.3], num_workers=0,
                            index_cache=str(tmp_path / "cache"))  # fmt: skip
    dm.setup("fit")
    assert dm.pixels == RGB8 and dm.mean == (0.5, 0.4, 0.3) and dm.std == tuple(IMAGENET_STD)
    assert "data statistics" not in capsys.readouterr().out


def test_a_malformed_input_record_is_refused_in_one_line():
    from swinv2.checkpoint import check_inputs
    from swinv2.reading import MalformedRecordError

    good = {"depth": "uint16", "mean": [0.1, 0.2], "std": [0.3, 0.4]}
    assert check_inputs(good, 2, "f") == good
    for bad, message in (
        ({**good, "depth": "uint12"}, "depth 'uint12' is unknown"),
        ({**good, "mean": [0.1]}, "mean is not 2 finite values"),
        ({**good, "std": [0.3, 0.0]}, "std is not 2 finite values"),
        ({**good, "std": [0.3, float("nan")]}, "std is not 2 finite values"),
        ({**good, "extra": 1}, "is not {depth, mean, std}"),
    ):
        with pytest.raises(MalformedRecordError, match=message):
            check_inputs(bad, 2, "f")


def test_the_monitors_read_the_images_of_a_13_band_run_as_it_trains_on_them(tmp_path):
    """The kNN and quick fine-tune monitors on labelled 13-band tiles: decoded in the run's format, normalised with
    its worked-out statistics."""
    root = _labelled_geotiffs(tmp_path / "tiles")
    cli, _, inputs, _ = _pretrain(root, tmp_path, "--model.knn_root", str(root), "--model.knn_every_n_epochs", "1",
                                  "--model.finetune_every_n_epochs", "1", "--model.finetune_steps", "5")  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert 0 <= float(metrics["val/knn_acc1"]) <= 100 and 0 <= float(metrics["val/finetune_acc1"]) <= 100
    from simmim.monitors import QuickFinetuneMonitor, training_inputs

    assert training_inputs(cli.model) == {"mean": tuple(inputs["mean"]), "std": tuple(inputs["std"]),
                                          "fmt": PixelFormat(13, "uint16")}  # fmt: skip
    quick = next(c for c in cli.trainer.callbacks if isinstance(c, QuickFinetuneMonitor))
    assert quick.data[0][0].shape[1:] == (13, 32, 32)


def test_pretraining_continues_from_rgb_weights_in_a_13_band_encoder_only_when_asked(tmp_path):
    from simmim.pretrain.module import SimMIMPretrainer

    rgb = swinv2.create_model("swinv2_tiny", img_size=32, window_size=4, embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                              mask_token=True)  # fmt: skip
    swinv2.save_weights(tmp_path / "rgb.safetensors", rgb)
    arch = dict(arch="swinv2_tiny", img_size=32, window_size=4, in_chans=13, knn_every_n_epochs=0,
                encoder_kwargs={"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]})  # fmt: skip
    with pytest.raises(swinv2.CheckpointMismatchError, match="trained on 3-channel images and the model takes 13"):
        SimMIMPretrainer(**arch, pretrained=str(tmp_path / "rgb.safetensors"))
    module = SimMIMPretrainer(**arch, pretrained=str(tmp_path / "rgb.safetensors"), adapt_channels=True)
    stem = module.encoder.patch_embed.proj.weight
    torch.testing.assert_close(stem, swinv2.adapt_in_chans(rgb.patch_embed.proj.weight, 13))
    torch.testing.assert_close(
        module.encoder.layers[1].blocks[0].mlp.fc1.weight, rgb.layers[1].blocks[0].mlp.fc1.weight
    )
    root = _geotiffs(tmp_path / "tiles", 8)
    cli, model, _, _ = _pretrain(root, tmp_path, "--model.pretrained", str(tmp_path / "rgb.safetensors"),
                                 "--model.adapt_channels", "true")  # fmt: skip
    assert model.in_chans == 13 and cli.model.hparams.adapt_channels and cli.trainer.global_step > 0


def _write_table(path, table, chunk_rows):
    """`table` as a parquet file (row groups of `chunk_rows`) or, for a `.arrow` path, an Arrow stream as `datasets`
    writes it (record batches of `chunk_rows`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=chunk_rows)
        return
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=chunk_rows):
            writer.write_batch(batch)


def _imagenet_table(root, kind="parquet", classes=("tench", "goldfish"), per_class=8):
    """A Hugging Face `imagenet-1k`-layout dataset: an `image` column of {bytes, path} structs (PNG bytes), an int64
    `label` column, the class names in the files' Hugging Face metadata; chunks of 4 rows. Parquet as the Hub lays
    it out (data/train-0000k-of-00002.parquet, data/validation-00000-of-00001.parquet); Arrow as
    `DatasetDict.save_to_disk` does (train/data-0000k-of-00002.arrow, validation/data-00000-of-00001.arrow)."""
    import json

    import pyarrow as pa

    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": list(classes), "_type": "ClassLabel"}}}}  # fmt: skip
    rng = np.random.default_rng(11)

    def write(split, shard, shards, n):
        name = f"{split}-{shard:05d}-of-{shards:05d}"
        rows = []
        for i in range(n):
            label = i % len(classes)
            img = np.full((40, 40, 3), 60 + 120 * label, np.uint8) + rng.integers(0, 40, (40, 40, 3), dtype=np.uint8)
            rows.append(({"bytes": cv2.imencode(".png", img)[1].tobytes(), "path": f"{name}_{i}.png"}, label))
        table = pa.table({"image": [r[0] for r in rows], "label": pa.array([r[1] for r in rows], pa.int64())})
        table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
        path = root / "data" / f"{name}.parquet"
        if kind == "arrow":
            path = root / split / f"data-{shard:05d}-of-{shards:05d}.arrow"
        _write_table(path, table, 4)

    write("train", 0, 2, len(classes) * per_class // 2)
    write("train", 1, 2, len(classes) * per_class // 2)
    write("validation", 0, 1, len(classes) * 4)
    if kind == "arrow":
        (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    return root


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_a_hugging_face_dataset_on_disk_reads_as_a_shard_set_by_chunk(tmp_path, kind):
    from simmim.data.shards import open_shard_split
    from simmim.data.tables import TableSet

    root = _imagenet_table(tmp_path / "imagenet", kind)
    train, val = open_shard_split(root)
    assert isinstance(train, TableSet) and len(train) == 16 and len(val) == 8
    assert train.classes == ["tench", "goldfish"] and train.unlabelled == 0
    assert list(train.chunk_sizes) == [4, 4, 4, 4]  # row groups or record batches: what the sampler shuffles
    key, label, data, chunk = train.read(5)
    first = "train-00000-of-00002.parquet" if kind == "parquet" else "data-00000-of-00002.arrow"
    assert key == "train-00000-of-00002_5.png" and label == 1 and chunk == f"{first}#1"
    assert train.decode(5).shape == (40, 40, 3) and train.label(5) == 1
    assert train.decode(5, RGB8).mean() > train.decode(4, RGB8).mean()  # class 1 is the brighter one


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_a_hugging_face_dataset_on_disk_pretrains_and_fine_tunes(tmp_path, kind):
    root = _imagenet_table(tmp_path / "imagenet", kind)
    cli, model, _, version = _pretrain(root, tmp_path / "pre")
    assert model.in_chans == 3 and cli.datamodule.pixels == RGB8 and cli.trainer.global_step > 0
    fine, exported = _finetune(root, tmp_path, "--model.pretrained", str(version / "encoder.safetensors"))
    assert fine.datamodule.classes == ["tench", "goldfish"] and len(fine.datamodule.val_files) == 8
    assert (
        swinv2.create_model_from_checkpoint(exported).num_classes == 2 and "val/acc1" in fine.trainer.callback_metrics
    )


def test_parquet_files_of_another_layout_are_refused_in_one_line(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from simmim.data.tables import TableSet
    from simmim.errors import DataFolderError

    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    cases = {
        "no_image": (pa.table({"pixels": [png]}), None, "no image column"),
        "text_image": (pa.table({"image": ["a path"]}), None, "its image column is string"),
        "float_label": (pa.table({"image": [png], "label": [0.5]}), None, "is double, not integers"),
        "label_out": (pa.table({"image": [png], "label": pa.array([3], pa.int64())}), ["a", "b"], "a label is 3"),
        "bad_names": (pa.table({"image": [png]}), [1, 2], "malformed list of label names"),
        "more_fields": (  # nothing but bytes and a path is turned into Python objects
            pa.table({"image": [{"bytes": png, "path": "a.png", "nulls": [None] * 1000}]}),
            None,
            r"its image column is struct<bytes: binary, path: string, nulls: list<\w+: null>>, not bytes",
        ),
        "path_list": (pa.table({"image": [{"bytes": png, "path": [None] * 10}]}), None, "not bytes or {bytes, path}"),
    }
    for name, (table, names, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        if names is not None:
            meta = {"info": {"features": {"label": {"names": names}}}}
            table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
        pq.write_table(table, folder / "train-00000-of-00001.parquet")
        with pytest.raises(DataFolderError, match=message):
            TableSet(folder)
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataFolderError, match="cannot read .*x.parquet"):
        TableSet(tmp_path / "fake")


def test_arrow_files_that_are_compressed_damaged_or_not_files_are_refused_in_one_line(tmp_path):
    """An Arrow stream is memory-mapped and read in place. Refused before anything is inflated or indexed: a
    compressed batch (it would be inflated to a size it states itself), a batch whose offsets point past its data
    (found by the full validation), a link to something other than a regular file, a file that is not a stream.
    The `datasets` cache's names (`<name>-train-...arrow`, `<name>-validation-...arrow`) split."""
    from pathlib import Path

    import pyarrow as pa

    from simmim.data.shards import open_shard_split
    from simmim.data.tables import TableSet
    from simmim.errors import DataFolderError

    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    table = pa.table({"image": [png] * 6, "label": pa.array([0, 1] * 3, pa.int64())})

    zipped = tmp_path / "zipped"
    zipped.mkdir()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.OSFile(str(zipped / "data-00000-of-00001.arrow"), "wb") as f:
        with pa.ipc.new_stream(f, table.schema, options=options) as writer:
            writer.write_table(table)
    with pytest.raises(DataFolderError, match="record batch of .*data-00000-of-00001.arrow at byte .* is compressed"):
        TableSet(zipped)

    damaged = tmp_path / "damaged" / "data-00000-of-00001.arrow"
    _write_table(damaged, table, 6)
    raw = bytearray(damaged.read_bytes())
    offsets = np.arange(7, dtype=np.int32) * len(png)  # the image column's offsets, as written
    at = bytes(raw).find(offsets.tobytes())
    assert at > 0
    raw[at + 4 * 2 : at + 4 * 3] = np.int32(5 * len(png)).tobytes()  # a middle offset past the next: only a full
    # validation looks at every offset
    damaged.write_bytes(bytes(raw))
    with pytest.raises(DataFolderError, match="record batch of .* is damaged"):
        TableSet(damaged.parent)

    old_ipc = tmp_path / "v4" / "data-00000-of-00001.arrow"  # version 4 marked compression in custom metadata
    old_ipc.parent.mkdir()
    options = pa.ipc.IpcWriteOptions(metadata_version=pa.ipc.MetadataVersion.V4)
    with pa.OSFile(str(old_ipc), "wb") as f, pa.ipc.new_stream(f, table.schema, options=options) as writer:
        writer.write_table(table)
    with pytest.raises(DataFolderError, match="record batch of .* is not read: a message of another IPC version"):
        TableSet(old_ipc.parent)
    marked = tmp_path / "marked" / "data-00000-of-00001.arrow"
    marked.parent.mkdir()
    with pa.OSFile(str(marked), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_batch(table.to_batches()[0], custom_metadata={"ARROW:experimental_compression": "zstd"})
    with pytest.raises(DataFolderError, match="record batch of .* is not read: a message with custom metadata"):
        TableSet(marked.parent)

    linked = tmp_path / "linked"  # as the Hub's cache links its files to blobs: followed to a regular file only
    linked.mkdir()
    _write_table(tmp_path / "blob", table, 3)
    (linked / "data-00000-of-00001.arrow").symlink_to(tmp_path / "blob")
    assert len(TableSet(linked)) == 6
    (linked / "data-00000-of-00001.arrow").unlink()
    (linked / "data-00000-of-00001.arrow").symlink_to("/dev/zero")
    with pytest.raises(DataFolderError, match="data-00000-of-00001.arrow is not a regular file"):
        TableSet(linked, [linked / "data-00000-of-00001.arrow"])

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "x.arrow").write_bytes(b"not an arrow stream")
    with pytest.raises(DataFolderError, match="cannot read .*x.arrow as an Arrow stream"):
        TableSet(tmp_path / "text")

    mixed = tmp_path / "mixed"
    _write_table(mixed / "a.arrow", table, 3)
    _write_table(mixed / "data" / "b.parquet", table, 3)
    assert [Path(p).name for p in TableSet(mixed).paths] == ["b.parquet"]  # parquet first: a folder is one kind
    with pytest.raises(DataFolderError, match="mixes .parquet and .arrow"):
        TableSet(mixed, [mixed / "a.arrow", mixed / "data" / "b.parquet"])

    cache = tmp_path / "cache"
    for split, n in (("train", 2), ("validation", 1), ("test", 1)):
        for k in range(n):
            _write_table(cache / f"imagenet-1k-{split}-{k:05d}-of-{n:05d}.arrow", table, 3)
    train, val = open_shard_split(cache)
    assert [Path(p).name for p in train.paths] == [
        "imagenet-1k-train-00000-of-00002.arrow",
        "imagenet-1k-train-00001-of-00002.arrow",
    ]
    assert [Path(p).name for p in val.paths] == ["imagenet-1k-validation-00000-of-00001.arrow"]
    assert len(train) == 12 and train.decode(7).shape == (8, 8, 3)


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_an_epoch_in_the_samplers_order_reads_each_chunk_once(tmp_path, kind):
    """The sampler shuffles within windows of 4 chunks (row groups, record batches): a one-chunk cache would read a
    chunk again at almost every sample; the kept chunks (two windows) read each once per epoch."""
    from simmim.data.shards import open_shard_split
    from simmim.seeding import ShardSampler, sample_seed

    root = _imagenet_table(tmp_path / "imagenet", kind, per_class=20)  # 40 training rows: 10 chunks of 4
    train = open_shard_split(root).train
    sampler = ShardSampler(train.chunk_sizes, 0)
    keys = [sample_seed(k)[0] for k in sampler]
    assert sorted(keys) == list(range(40))
    for i in keys:
        train.read(i)
    assert train.groups_read == 10


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_table_labels_stay_with_their_rows_across_files_chunks_and_splits(tmp_path, suffix):
    """Two files without class metadata, chunks of 3, a null label: every row's label is the one its pixels
    encode, in the whole set and in its whole-chunk splits (which read as tables too)."""
    import pyarrow as pa

    from simmim.data.shards import open_shard_split
    from simmim.data.tables import TableSet

    (tmp_path / "set").mkdir()
    for f, labels in enumerate(([0, 1, 2, 1, 0, None, 2], [2, 2, 0, 1, 1])):
        images = [{"bytes": cv2.imencode(".png", np.full((8, 8, 3), 100 + 40 * (-1 if y is None else y),
                                                         np.uint8))[1].tobytes(), "path": f"{f}_{i}.png"}
                  for i, y in enumerate(labels)]  # fmt: skip
        table = pa.table({"image": images, "label": pa.array(labels, pa.int64())})
        _write_table(tmp_path / "set" / f"part-{f}{suffix}", table, 3)
    whole = open_shard_split(tmp_path / "set").train
    assert len(whole) == 12 and whole.classes == ["0", "1", "2"] and whole.unlabelled == 1
    assert list(whole.chunk_sizes) == [3, 3, 1, 3, 2]

    def agree(view):
        for i in range(len(view)):
            encoded = (int(view.decode(i)[0, 0, 0]) - 100) // 40
            assert view.label(i) == view.read(i)[1] == encoded, (i, view.read(i)[0])

    agree(whole)
    train, val = whole.val_split(0.4)
    assert isinstance(train, TableSet) and isinstance(val, TableSet) and len(train) + len(val) == 12
    agree(train)
    agree(val)
    agree(whole.pick_chunks(0.5, seed=1)[0])


@pytest.mark.parametrize("kind", ["png16", "npy"])
def test_one_channel_exports_fine_tune_and_probe_with_no_channel_option(tmp_path, kind):
    """Grayscale 16-bit PNGs and float arrays in two class folders: pretraining's 1-channel export is read by
    fine-tuning and the probe with its pixel type and normalisation, no option given."""
    from simmim.probe import main as probe

    rng = np.random.default_rng(12)
    for cls, level in (("dark", 0), ("bright", 1)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(8):
            if kind == "png16":
                image = rng.integers(1000, 9000, (40, 40)).astype(np.uint16) + np.uint16(20000 * level)
                cv2.imwrite(str(tmp_path / "data" / cls / f"{i}.png"), image)
            else:
                np.save(tmp_path / "data" / cls / f"{i}.npy", rng.normal(3.0 * level, 0.5, (40, 40)).astype(np.float32))
    _, _, inputs, version = _pretrain(tmp_path / "data", tmp_path / "pre")
    export = version / "encoder.safetensors"
    cli, exported = _finetune(tmp_path / "data", tmp_path, "--model.pretrained", str(export))
    depth = "uint16" if kind == "png16" else "float32"
    assert cli.datamodule.pixels == PixelFormat(1, depth) and cli.model.model.in_chans == 1
    assert list(cli.model.mean) == inputs["mean"] and swinv2.read_inputs(swinv2.read_checkpoint(exported)) == inputs
    assert 0 <= probe(["--checkpoint", str(export), "--data.root", str(tmp_path / "data"), "--epochs", "5"]) <= 100


def test_the_converter_keeps_band_tiffs_and_arrays_and_their_shards_pretrain(tmp_path):
    """13-band tiles and float arrays are images to the converter as to the stages (it once checked them with the
    8-bit decoder, which refuses both)."""
    from simmim.data import convert
    from simmim.data.shards import ShardSet

    root = _geotiffs(tmp_path / "src" / "tiles", 6)
    np.save(root / "plane.npy", np.random.default_rng(0).random((40, 40, 13), dtype=np.float32))
    assert convert.main([str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1"]) == 7
    assert ShardSet(tmp_path / "out").unlabelled == 0
    cli, model, inputs, _ = _pretrain(tmp_path / "out", tmp_path, "--data.depth", "float32")
    assert model.in_chans == 13 and inputs["depth"] == "float32"
