"""Do the pretraining monitors rank checkpoints as fine-tuning does? For every checkpoint of a pretraining run, the
quick fine-tune monitor's top-1 (`simmim.monitors`, exactly as the callback computes it) and the kNN top-1
(`simmim.monitors`), against the mean top-1 of full fine-tuning runs from the same checkpoint (read from the study's
results file); Spearman rank correlation of each monitor with fine-tuning.

    python benchmarks/monitor_correlation.py runs/study/pt_photos_hi --root data/photos/prepared \\
        --finetuned 'ft_photos_hi{epoch}_f0.1_e100_ld0.9_s' --epochs 10 20 40 60 80 100

The checkpoints are `RUN/ckpt/epoch={epoch - 1}.ckpt`; the fine-tuning results are the rows of
`runs/study/results.jsonl` whose name starts with the `--finetuned` pattern.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from scipy.stats import spearmanr

import swinv2
from simmim.data.folders import labelled_split
from simmim.monitors import knn_top1, load_images, quick_finetune_top1
from simmim.seeding import monitor_generator


def features(encoder: torch.nn.Module, images: torch.Tensor, bf16: bool) -> torch.Tensor:
    encoder.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return torch.cat(
            [encoder.forward_head(encoder.forward_features(x), pre_logits=True).float() for x in images.split(256)]
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--root", default=None, help="labelled folder (default: the built-in digits)")
    p.add_argument("--label-fraction", type=float, default=0.1, help="the monitor's (its default: 0.1)")
    p.add_argument("--steps", type=int, default=100, help="the monitor's (its default: 100)")
    p.add_argument("--finetuned", required=True)
    p.add_argument("--epochs", type=int, nargs="+", required=True)
    p.add_argument("--results", type=Path, default=Path("runs/study/results.jsonl"))
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as the default configs train")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    p.add_argument("--cache", type=Path, default=None, help="monitor values by epoch (JSON), read and extended")
    args = p.parse_args()
    cache = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}

    monitor = labelled_split(args.root, 0.2, args.label_fraction, "--root")
    train, val = load_images(*monitor[:2], 64), load_images(*monitor[2:4], 64)
    labelled = labelled_split(args.root, 0.2, 1.0, "--root")  # kNN votes with every training label, as the callback
    knn_train, knn_val = load_images(*labelled[:2], 64), load_images(*labelled[2:4], 64)
    rows = [json.loads(line) for line in args.results.read_text().splitlines()]
    table = []
    for epoch in args.epochs:
        accs = [
            r["val/acc1"] for r in rows if r["name"].startswith(args.finetuned.format(epoch=epoch)) and "val/acc1" in r
        ]
        if str(epoch) in cache:
            quick, knn = cache[str(epoch)]
            table.append((epoch, quick, knn, statistics.mean(accs) if accs else float("nan"), len(accs)))
            continue
        encoder = swinv2.create_model_from_checkpoint(args.run / "ckpt" / f"epoch={epoch - 1}.ckpt", num_classes=0)
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)  # noqa: E731
        quick = quick_finetune_top1(
            encoder, train, val, len(monitor[4]), args.steps, generator=monitor_generator(), autocast=autocast
        )
        knn = 100 * knn_top1(
            features(encoder, knn_train[0], args.bf16),
            knn_train[1],
            features(encoder, knn_val[0], args.bf16),
            knn_val[1],
            len(labelled[4]),
        )
        table.append((epoch, quick, knn, statistics.mean(accs) if accs else float("nan"), len(accs)))
        print(table[-1], flush=True)
        if args.cache:
            cache[str(epoch)] = [quick, knn]
            args.cache.write_text(json.dumps(cache))
    done = [r for r in table if r[4]]
    lines = [
        f"Checkpoints of {args.run}; monitor: {args.steps} steps on {len(train[1])} labelled images, scored on "
        f"{len(val[1])}; fine-tuned: mean of the runs named `{args.finetuned}*` (epoch filled in).",
        "",
        "| pretraining epochs | quick fine-tune monitor | kNN monitor | fine-tuned top-1 (runs) |",
        "|---|---|---|---|",
        *[f"| {e} | {q:.1f} | {k:.1f} | {f:.1f} ({n}) |" for e, q, k, f, n in table],
        "",
        f"Spearman with fine-tuned top-1 over {len(done)} checkpoints: quick fine-tune "
        f"{spearmanr([r[1] for r in done], [r[3] for r in done])[0]:.2f}, kNN "
        f"{spearmanr([r[2] for r in done], [r[3] for r in done])[0]:.2f}",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
