"""The pretraining-payoff study: many pretraining and fine-tuning runs of the two stage command lines, two at a
time with one thread each (on 2 cores about 1.6x the throughput of one run on two threads), each result appended
to a JSON-lines file as it finishes, so an interrupted study resumes where it stopped.

    python benchmarks/payoff_study.py PLAN.json --out runs/study/results.jsonl

PLAN.json is a list of jobs, {"name": ..., "stage": "pretrain" | "finetune", "args": [...], "after": [names]},
read again every few seconds (jobs appended while it runs are picked up); a job starts once the jobs it names have
finished. A job's result is the `val/` metrics its trainer holds at the end (a fine-tuning job's `val/acc1`: from
its last validation), and a pretraining job's export path.
`docs/payoff.md` lists the plans run and their tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

CHILD = """
import json, sys
from simmim.{stage}.cli import main
cli = main(sys.argv[1:])
metrics = {{k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}}
if "{stage}" == "pretrain" and cli.export.path is not None:
    metrics["export"] = str(cli.export.path)
print("RESULT " + json.dumps(metrics))
"""


def start(job: dict, log_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    log = open(log_dir / f"{job['name']}.log", "w")
    cmd = [sys.executable, "-c", CHILD.format(stage=job["stage"]), *job["args"]]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def result(log_file: Path) -> dict:
    lines = [line for line in log_file.read_text().splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else {}


def run_jobs(read_jobs: Callable[[], List[dict]], out: Path, slots: Callable[[], int] = lambda: 2) -> List[dict]:
    """Run every job `read_jobs()` lists (called again every round), `slots()` at a time, appending each result to
    `out`; jobs already in `out` with return code 0 are skipped (failed ones run again), and so are jobs whose log
    already ends in a result (a run that finished while no study was watching it). A study that is killed leaves its
    runs running: wait for them (or kill them) before starting it again. Returns the rows of `out`, the last one of
    each job."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.parent / "logs"
    log_dir.mkdir(exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {r["name"] for r in rows if r["rc"] == 0}
    pending: List[dict] = []
    running: Dict[str, Tuple[subprocess.Popen, dict, float]] = {}
    while True:
        known = done | set(running) | {j["name"] for j in pending}
        pending += [j for j in read_jobs() if j["name"] not in known]
        if not pending and not running:
            break
        for name, (proc, job, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            row = {"name": name, "rc": proc.returncode, "seconds": round(time.time() - t0)}
            row.update(result(log_dir / f"{name}.log"), job=job)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            done.add(name)
            print(json.dumps({k: v for k, v in row.items() if k != "job"}), flush=True)
        ready = [j for j in pending if all(a in done for a in j.get("after", []))]
        if pending and not ready and not running:
            print(f"not run, a job they wait for failed: {[j['name'] for j in pending]}", flush=True)
            break
        while ready and len(running) < slots():
            job = ready.pop(0)
            pending.remove(job)
            log = log_dir / f"{job['name']}.log"
            if log.exists() and result(log):
                with open(out, "a") as f:
                    f.write(json.dumps({"name": job["name"], "rc": 0, "seconds": -1, **result(log), "job": job}) + "\n")
                done.add(job["name"])
                continue
            running[job["name"]] = (start(job, log_dir), job, time.time())
        time.sleep(2)
    last = {r["name"]: r for r in map(json.loads, out.read_text().splitlines())}
    return list(last.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/study/results.jsonl"))
    p.add_argument("--slots", type=Path, default=None, help="a file holding the number of runs at a time (default 2)")
    args = p.parse_args()
    slots = (lambda: int(args.slots.read_text())) if args.slots else (lambda: 2)
    run_jobs(lambda: json.loads(args.plan.read_text()), args.out, slots)


if __name__ == "__main__":
    main()
