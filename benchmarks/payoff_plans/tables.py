"""Print the study's results (runs/study/results.jsonl) as one markdown table: each fine-tuning run's name,
setting by setting, and its final val/acc1; each pretraining run's final val/loss and kNN top-1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

rows = [json.loads(line) for line in Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study/results.jsonl").open()]
print("| run | val/acc1 | val/loss | kNN top-1 | seconds |\n|---|---|---|---|---|")
for r in sorted(rows, key=lambda r: r["name"]):
    acc, loss, knn = (r.get(k) for k in ("val/acc1", "val/loss", "val/knn_acc1"))
    fmt = lambda v, d: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    print(f"| {r['name']} | {fmt(acc, 1)} | {fmt(loss, 3)} | {fmt(knn, 1)} | {r['seconds']} |")
