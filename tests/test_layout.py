"""The package layout's rules (docs/layout.md), read from the source: shared modules import only lower layers and no
stage, stages never import each other, `swinv2` never imports `simmim`, nothing is re-exported twice, nothing cites
files outside the repository, documented names resolve."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("eval", "finetune", "pretrain")
# The shared layer, lowest first (docs/layout.md): a module imports only lower layers and its own package.
LAYERS = {
    "simmim.errors": 0,
    "simmim.checkpointing.untrusted": 1,
    "simmim.checkpointing.runs": 1,
    "simmim.seeding": 2,
    "simmim.data": 3,
    "simmim.distributed": 4,
    "simmim.checkpointing.exports": 5,
    "simmim.optim": 5,
    "simmim.stage": 6,
    "simmim.monitors": 6,
    "simmim.cli": 7,
}
ENTRY_POINTS = ("activations.py", "export.py", "probe.py", "reconstruct.py", "shard.py", "transfer.py")


def imported_modules(path: Path, root: Path = ROOT) -> set:
    """Every module a file imports (absolute names; relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _files(folder: Path):
    return sorted(folder.rglob("*.py"))


def test_the_stages_are_subpackages():
    assert all((ROOT / "simmim" / s / "__init__.py").exists() for s in STAGES)


def layer_of(module: str):
    """The layer of a shared module (`LAYERS`, a package's entry covering its modules); None outside the layer."""
    for name, layer in LAYERS.items():
        if module == name or module.startswith(name + "."):
            return layer, name
    return None


def layer_violations(root: Path, layers=None) -> list:
    """(file, module) for every import of a shared module from a shared module of the same or a lower layer (other
    than its own package), and of every shared file `LAYERS` does not place."""
    found = []
    for path in _files(root / "simmim"):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        if path.name in ("__init__.py", *ENTRY_POINTS) or module.split(".")[1] in STAGES:
            continue  # package docstrings (they import nothing), the command shims, the stages
        own = layer_of(module)
        if own is None:
            found.append((str(path.relative_to(root)), "not placed in LAYERS"))
            continue
        for m in imported_modules(path, root):
            other = layer_of(m) if m.startswith("simmim.") else None
            same_package = m.split(".")[:2] == module.split(".")[:2]  # simmim.data.*, simmim.checkpointing.*
            if other is not None and not same_package and other[0] >= own[0]:
                found.append((str(path.relative_to(root)), m))
    return found


def test_shared_modules_import_only_lower_layers():
    assert layer_violations(ROOT) == [], "docs/layout.md: a shared module imports only lower layers"


def test_the_layer_checker_sees_an_upward_import_and_an_unplaced_module(tmp_path):
    (tmp_path / "simmim" / "data").mkdir(parents=True)
    (tmp_path / "simmim" / "data" / "images.py").write_text("from simmim.cli import StageCLI\n")
    (tmp_path / "simmim" / "seeding.py").write_text("from simmim.checkpointing.untrusted import checked_counts\n")
    (tmp_path / "simmim" / "extra.py").write_text("")
    found = layer_violations(tmp_path)
    assert ("simmim/data/images.py", "simmim.cli") in found and ("simmim/extra.py", "not placed in LAYERS") in found
    assert not [f for f in found if f[0] == "simmim/seeding.py"]  # layer 2 reading layer 1: allowed


def test_nothing_is_re_exported_twice():
    """A stage's `__init__` exports its command line only; the classes are re-exported by `simmim` alone."""
    for stage in ("pretrain", "finetune"):
        tree = ast.parse((ROOT / "simmim" / stage / "__init__.py").read_text())
        exported = [a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names]
        assert exported == ["main"], (stage, exported)
    for package in ("data", "checkpointing", "eval"):
        tree = ast.parse((ROOT / "simmim" / package / "__init__.py").read_text())
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], package


def cross_stage_imports(root: Path) -> list:
    """(file, module) for every import of one stage subpackage of `root/simmim` from inside another."""
    stages = [s for s in STAGES if (root / "simmim" / s).is_dir()]
    found = []
    for stage in stages:
        for path in _files(root / "simmim" / stage):
            for m in imported_modules(path, root):
                if any(m == f"simmim.{o}" or m.startswith(f"simmim.{o}.") for o in stages if o != stage):
                    found.append((str(path.relative_to(root)), m))
    return found


def test_no_stage_imports_another():
    assert cross_stage_imports(ROOT) == [], "move what both stages need to the top of simmim/"


def test_fresh_interpreters_load_no_other_stage_and_swinv2_no_lightning():
    """At run time too, packages' `__init__` re-exports included: each import in a fresh interpreter, the three
    side by side (each is mostly one core importing)."""
    loaded = "sorted({m.split('.')[1] for m in sys.modules if m.startswith('simmim.')})"
    banned = "('simmim', 'lightning', 'pytorch_lightning', 'lightning_fabric', 'omegaconf')"
    codes = {stage: f"import sys, simmim, simmim.{stage}; print({loaded})" for stage in ("pretrain", "finetune")}
    codes["swinv2"] = f"import sys, swinv2; print(sorted({{m for m in sys.modules if m.split('.')[0] in {banned}}}))"
    procs = {
        name: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        for name, code in codes.items()
    }
    found = {name: ast.literal_eval(proc.communicate(timeout=300)[0].strip()) for name, proc in procs.items()}
    for stage in ("pretrain", "finetune"):
        assert stage in found[stage] and not set(found[stage]) & (set(STAGES) - {stage}), found[stage]
    assert found["swinv2"] == [], found["swinv2"]


def _is_entry_point(path: Path) -> bool:
    """A top-level `python -m simmim.<name>` shim: a docstring, `from simmim.errors import user_errors_as_messages`,
    `from simmim.<subpackage>.<module> import main` and the `__main__` guard calling it, nothing else."""
    body = ast.parse(path.read_text()).body
    if len(body) != 4 or not isinstance(body[0], ast.Expr) or not isinstance(body[3], ast.If):
        return False
    errors, imp = sorted(body[1:3], key=lambda node: getattr(node, "module", "") != "simmim.errors")  # either order
    one_line = isinstance(errors, ast.ImportFrom) and errors.module == "simmim.errors"
    one_line = one_line and [a.name for a in errors.names] == ["user_errors_as_messages"]
    main = isinstance(imp, ast.ImportFrom) and [a.name for a in imp.names] == ["main"] and imp.module.count(".") == 2
    return one_line and main


def test_entry_points_are_shims_only():
    for name in ENTRY_POINTS:
        assert _is_entry_point(ROOT / "simmim" / name), name


def test_shared_modules_import_no_stage():
    for path in _files(ROOT / "simmim"):
        parts = path.relative_to(ROOT / "simmim").parts
        if parts == ("__init__.py",) or path.name in ENTRY_POINTS or parts[0] in STAGES:
            continue  # the package's re-exports; the command shims; the stages
        bad = [m for m in imported_modules(path) for s in STAGES if m.startswith(f"simmim.{s}")]
        assert not bad, f"{path.relative_to(ROOT)} is shared but imports {bad}"


def test_swinv2_imports_neither_simmim_nor_lightning_nor_omegaconf():
    for path in _files(ROOT / "swinv2"):
        banned = ("simmim", "lightning", "pytorch_lightning", "lightning_fabric", "omegaconf")
        bad = [m for m in imported_modules(path) if m.split(".")[0] in banned]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_rule_checker_sees_a_cross_import(tmp_path):
    """The checker itself, on a copy of the layout where one stage imports the other in both import forms."""
    for stage in ("pretrain", "finetune"):
        (tmp_path / "simmim" / stage).mkdir(parents=True)
        (tmp_path / "simmim" / stage / "__init__.py").write_text("")
    probe = tmp_path / "simmim" / "pretrain" / "data.py"
    probe.write_text(
        "from simmim.finetune.data import image_folder\nimport simmim.finetune\nfrom ..finetune import x\n"
    )
    found = {m for _, m in cross_stage_imports(tmp_path)}
    assert {"simmim.finetune.data", "simmim.finetune", "simmim.finetune.x"} <= found


def test_the_architecture_record_has_one_owner():
    """Only `swinv2/checkpoint.py` names the record's key; everything else goes through its functions."""
    for path in [*_files(ROOT / "simmim"), *_files(ROOT / "swinv2")]:
        if path != ROOT / "swinv2" / "checkpoint.py":
            text = path.read_text()
            assert "ARCH_KEY" not in text and "swinv2_architecture" not in text, path.relative_to(ROOT)


def test_nothing_cites_files_outside_the_repository():
    texts = [*_files(ROOT / "simmim"), *_files(ROOT / "swinv2"), *ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md")]
    texts += [*(ROOT / "configs").rglob("*.yaml"), *(ROOT / "notebooks").glob("*.ipynb"), *_files(ROOT / "benchmarks")]
    for path in texts:
        text = path.read_text()
        assert "REFERENCE.md" not in text and "../shared" not in text, path.relative_to(ROOT)


@pytest.mark.parametrize(
    "name",
    [
        "simmim.SimMIM",
        "simmim.MaskGenerator",
        "simmim.masked_l1_loss",
        "simmim.normalize_target",
        "simmim.SimMIMPretrainer",
        "simmim.PretrainDataModule",
        "simmim.SwinV2Classifier",
        "simmim.ClassificationDataModule",
        "simmim.pretrain.main",
        "simmim.finetune.main",
        "swinv2.create_model_from_checkpoint",
        "swinv2.save_weights",
        "swinv2.load_pretrained",
        "swinv2.read_checkpoint",
        "swinv2.to_timm_state_dict",
        "swinv2.transformers_config_kwargs",
    ],
)
def test_documented_names_resolve(name):
    module, attr = name.rsplit(".", 1)
    assert getattr(importlib.import_module(module), attr) is not None
