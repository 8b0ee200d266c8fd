"""Notebooks are committed without outputs and their code cells run against the package API, with small settings:
a notebook's cell tagged "parameters" (the papermill convention) is followed by the overrides below, as papermill
injects them. The notebooks share one runs folder, in order, as a user's would: 02 fine-tunes 01's export (run
alone, 02 pretrains briefly itself)."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

# Per notebook: Python run right after its "parameters" cell ({tmp}: the folder the notebooks share).
SMALL = {
    "01_quickstart.ipynb": """
EPOCHS = 1
RUNS = "{tmp}/runs"
EXTRA_ARGS = ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2", "--data.num_workers", "0",
              "--trainer.log_every_n_steps", "1", "--model.knn_root", "{tmp}/labelled"]
""",
    "02_finetune_and_transfer.ipynb": """
RUNS = "{tmp}/runs"
SMALL_RUN = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2", "--data.num_workers", "0"]
PRETRAIN_ARGS = ["--trainer.max_epochs", "1", "--model.knn_every_n_epochs", "0", *SMALL_RUN]  # run alone
FINETUNE_ARGS = ["--trainer.max_epochs", "1", "--trainer.val_check_interval", "2", *SMALL_RUN]
PROBE_STAGES = [-1]
PROBE_ARGS = ["--data.root", "{tmp}/labelled"]
TRANSFER_ARGS = ["--img_size", "32", "--window", "4", "--eval", "64:8", "--epochs", "1", "--embed_dim", "16",
                 "--depths", "1", "1", "--num_heads", "1", "2", "--biases", "table", "log_cpb"]
""",
}


def _is_parameters(cell) -> bool:
    return "parameters" in cell.get("metadata", {}).get("tags", [])


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The notebooks' runs folder, with a small labelled set (3 classes of 10 digits) for the kNN and the probe."""
    from simmim.data.builtin import DEFAULT_DIGITS_ROOT, prepare_digits

    digits = prepare_digits(DEFAULT_DIGITS_ROOT)
    folder = tmp_path_factory.mktemp("notebooks")
    for c in range(3):
        (folder / "labelled" / str(c)).mkdir(parents=True)
        for f in sorted((digits / str(c)).iterdir())[:10]:
            shutil.copy(f, folder / "labelled" / str(c) / f.name)
    return folder


EXPORTS: dict = {}  # what 01 exported, when it ran before 02

# Notebooks that train: slow (`make test` leaves them to `make test-slow`).
TRAINING = {"01_quickstart.ipynb", "02_finetune_and_transfer.ipynb"}


@pytest.mark.parametrize(
    "path", [pytest.param(p, marks=[pytest.mark.slow] if p.name in TRAINING else []) for p in NOTEBOOKS],
    ids=lambda p: p.name,
)  # fmt: skip
def test_notebook_runs_and_has_no_outputs(path, shared, monkeypatch, tmp_path):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # What a notebook makes in the temporary folder it removes: 03 once left 0.5 GB behind at every run, until the
    # test machine's disk was full.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # and in any process a notebook starts
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") for c in code), f"{path.name} was committed with outputs"
    assert (path.name in SMALL) == any(_is_parameters(c) for c in code), f"{path.name}: parameters cell vs SMALL"
    namespace: dict = {}
    for cell in code:
        exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
        if _is_parameters(cell):
            exec(SMALL[path.name].format(tmp=shared), namespace)
    if "plt" in namespace:
        namespace["plt"].close("all")
    assert not list(tmp_path.iterdir()), f"{path.name} left files in the temporary folder"
    if path.name == "01_quickstart.ipynb":
        EXPORTS["01"] = str(namespace["run"] / "encoder.safetensors")
    if path.name == "02_finetune_and_transfer.ipynb" and "01" in EXPORTS:
        assert namespace["ENCODER"] == EXPORTS["01"]  # 02 fine-tuned 01's export, not a pretraining of its own
