"""The shape of the code, for a refactoring's before/after: the shared modules of `simmim` (everything but the stages
and the entry-point shims), their lines, and the longest functions of `simmim` and `swinv2`.

    python benchmarks/code_shape.py [REPO]          # REPO: a checkout (default: this one)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

STAGES = ("pretrain", "finetune", "eval")
SHIMS = ("__init__.py", "__main__.py", "probe.py", "transfer.py", "activations.py", "reconstruct.py")


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
    package = root / "simmim"
    files = sorted(package.rglob("*.py"))
    shared = [f for f in files if f.relative_to(package).parts[0] not in STAGES and f.name not in SHIMS]
    lines = sum(len(f.read_text().splitlines()) for f in shared)
    print(f"shared modules: {len(shared)} files, {lines} lines")
    for f in shared:
        print(f"  {f.relative_to(root)}")
    functions = []
    for f in [*sorted(package.rglob("*.py")), *sorted((root / "swinv2").rglob("*.py"))]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{f.relative_to(root)}:{node.name}"))
    print("longest functions (lines, docstrings included):")
    for n, name in sorted(functions, reverse=True)[:10]:
        print(f"  {n:4d} {name}")


if __name__ == "__main__":
    main()
