"""The GPU check script runs end to end in its tiny CPU mode, so it does not rot between GPU sessions."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
@pytest.mark.timeout(900)  # above the script's own 600 s limit
def test_gpu_check_runs_every_step_in_cpu_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(SCRIPT), "--cpu"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    log = (tmp_path / "gpu_check.log").read_text()
    for step in ("encoder", "pretrain_step", "dataloader", "strategy_fsdp2"):
        assert f"== {step}: exit 0" in log, step
    assert "| fp32 | transformers |" in log and "last training loss" in log
    assert "| swinv2_tiny | fp32 | transformers |" in log and "| torchvision v2 |" in log
    for name in ("pretrain_step.md", "dataloader.md"):
        assert (tmp_path / name).is_file(), name
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool can bring back
