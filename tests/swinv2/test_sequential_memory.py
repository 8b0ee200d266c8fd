"""Sequential attention bounds memory: the peak of a training step, measured, falls as the chunk shrinks, in
forward and in backward, with and without activation checkpointing (`benchmarks/memory.py`, one fresh process)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "memory.py"


def test_peak_memory_falls_as_the_chunk_shrinks(tmp_path):
    # One stage of 2 blocks, 128x128 tokens in 16 windows of 32x32: each block's attention is 134 MB in fp32.
    args = ["--arch", "swinv2_tiny", "--encoder_kwargs", '{"embed_dim": 32, "depths": [2], "num_heads": [2]}']
    args += ["--sizes", "512", "--window", "32", "--chunks", "4", "1", "--one_process", "--json"]
    args += ["--out", str(tmp_path / "memory.md")]
    out = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert json.loads((tmp_path / "memory.json").read_text()) == printed  # the files gpu_check.sh brings back
    assert "| 512 |" in (tmp_path / "memory.md").read_text()
    rows = {r["name"]: r for r in printed}
    for phase in ("forward_mib", "backward_mib"):
        above = {name: r[phase] - r["model_mib"] for name, r in rows.items()}  # MiB above the built model
        for ladder in (["plain", "sequential-4", "sequential-1"], ["checkpoint", "both-4", "both-1"]):
            peaks = [above[n] for n in ladder]
            # each step saves at least 30 MiB here (a quarter of one block's attention or more)
            assert all(a - b > 30 for a, b in zip(peaks, peaks[1:])), (phase, dict(zip(ladder, peaks)))
        assert above["both-1"] < 0.3 * above["plain"], (phase, above)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_falls_as_the_chunk_shrinks():
    """The same ladder on a GPU, read exactly from the caching allocator (fused attention, bf16 autocast)."""
    import swinv2

    peaks = {}
    for checkpoint in (False, True):
        for chunk in (None, 4, 1):
            torch.manual_seed(0)
            model = swinv2.create_model(
                "swinv2_tiny", img_size=512, window_size=32, embed_dim=32, depths=(2,), num_heads=(2,),
                use_checkpoint=checkpoint, attn_chunk_size=chunk,
            ).cuda()  # fmt: skip
            x = torch.randn(1, 3, 512, 512, device="cuda")
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x).float().sum()
            loss.backward()
            torch.cuda.synchronize()
            peaks[(checkpoint, chunk)] = torch.cuda.max_memory_allocated() - base
            del model, x, loss
            torch.cuda.empty_cache()
    for checkpoint in (False, True):
        ladder = [peaks[(checkpoint, c)] for c in (None, 4, 1)]
        # never more with a smaller chunk; less with one window than all at once (whose fused kernel keeps the
        # shifted block's whole (nW, nH, N, N) mask, 67 MB here)
        assert ladder[0] >= ladder[1] >= ladder[2] and ladder[0] - ladder[2] > 30 * 2**20, (checkpoint, ladder)
