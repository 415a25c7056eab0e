#!/usr/bin/env python3
"""Side-by-side benchmark: weightx vs mergekit vs the I/O floor.

    python benchmarks/run.py [--preset default|small|tiny] [--repeats 3] [--data DIR]
                             [--only expo,dare,ties,bitdelta,ternary] [--device cpu|cuda]
                             [--json out.json]

For every case the three contenders run alternately (weightx, mergekit, floor; `--repeats`
times) on the same synthetic checkpoints (made once by shared/bench/gen_checkpoints.py and
cached). Each run is a fresh process tree; we record its wall time, its peak private
(anonymous) memory, sampled from /proc every ~20 ms and summed over the tree, and, as a
cross-check, the kernel's ru_maxrss (RSS high-water mark, which also counts mmapped file
pages). Outputs are deleted between runs, outside the timing.

Only the standard library is needed to run this file; the generator needs torch and
safetensors, which are taken from the project's venv when the running python lacks them.
See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_GENERATOR = REPO.parent / "shared" / "bench" / "gen_checkpoints.py"
DEFAULT_MERGEKIT_VENV = HERE / ".venv-mergekit"
STAMP = ".bench-complete.json"
ROLES = ("base", "sft", "dpo")
TOOLS = ("weightx", "weightx-warm", "weightx-nohash", "weightx-general", "mergekit", "floor")
DEFAULT_TOOLS = ("weightx", "mergekit", "floor")
# weightx contenders: the product (first run: it hashes its inputs), a rerun whose input hashes are
# cached, and a comparison-only run without provenance (WEIGHTX_BENCH_NO_HASH: no input or output
# sha256; the product never skips them) that prices the hashing as its own line, and a first run
# with the fused bf16 kernel switched off (WEIGHTX_FUSED=0: the general torch path it replaced).
# Every weightx run that hashes records its shards' sha256: the table says whether they all agree.
WEIGHTX_TOOLS = ("weightx", "weightx-warm", "weightx-nohash", "weightx-general")
# Presets the generator does not know: its default preset with these sizes.
SIZE_PRESETS = {
    # Llama-2-7B's shape: 6.74B parameters, 13.5 GB per checkpoint in bf16 (3 checkpoints: 40 GB).
    "7b": ["--hidden", "4096", "--intermediate", "11008", "--layers", "32", "--heads", "32",
           "--kv-heads", "32", "--vocab", "32000"],
}
PRESETS = ("default", "small", "tiny", *SIZE_PRESETS)
MB = 1024 * 1024

# Exit statuses / messages that mean "this weightx does not know that edit yet".
UNKNOWN_EDIT = re.compile(
    r"unknown (edit|op|operation|combine|method)|no such (edit|op)|not (yet )?(supported|implemented)|"
    r"unsupported (edit|op)|invalid edit|unknown.*(bitdelta|ternary)",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    roles: List[str]  # models the case reads (for the floor and data checks)
    weightx: Callable[[Dict[str, str], str, str], Dict[str, Any]]  # (models, out, shard) -> recipe
    mergekit: Optional[Callable[[Dict[str, str]], Dict[str, Any]]]  # (models) -> config
    output_format: str = "dense"  # dense | delta
    note: str = ""


def _output(path: str, shard: str, dtype: Optional[str] = "bfloat16", fmt: str = "dense",
            config_from: str = "dpo") -> Dict[str, Any]:
    out: Dict[str, Any] = {"path": path, "format": fmt, "shard_size": shard,
                           "config_from": config_from}
    if dtype:
        out["dtype"] = dtype
    return out


def _wx_one_delta(edits: List[Dict[str, Any]], fmt: str = "dense"):
    def recipe(m: Dict[str, str], out: str, shard: str) -> Dict[str, Any]:
        return {
            "name": "weightx-bench",
            "models": {"sft": m["sft"], "dpo": m["dpo"]},
            "base": "sft",
            "deltas": [{"model": "dpo", "weight": 1.0, "edits": edits}],
            "combine": "sum",
            "output": _output(out, shard, "bfloat16" if fmt == "dense" else None, fmt),
        }

    return recipe


def _wx_ties(m: Dict[str, str], out: str, shard: str) -> Dict[str, Any]:
    return {
        "name": "weightx-bench-ties",
        "models": {"base": m["base"], "sft": m["sft"], "dpo": m["dpo"]},
        "base": "base",
        "deltas": [{"model": "sft", "weight": 1.0}, {"model": "dpo", "weight": 1.0}],
        "combine": {"ties": {"density": 0.5}},
        "output": _output(out, shard),
    }


MERGEKIT_DTYPE = ["bfloat16"]  # set from --mergekit-dtype


def _mk_dtype() -> Dict[str, str]:
    # mergekit's `dtype` is the dtype tensors are loaded and (mostly) computed in; deltas
    # (model - base) are then rounded to it. float32 makes it exact, at a cost.
    if MERGEKIT_DTYPE[0] == "bfloat16":
        return {"dtype": "bfloat16"}
    return {"dtype": MERGEKIT_DTYPE[0], "out_dtype": "bfloat16"}


def _mk_expo(m: Dict[str, str]) -> Dict[str, Any]:
    # ExPO with alpha=0.3: dpo + 0.3 (dpo - sft) = 1.3 dpo - 0.3 sft.
    return {
        "merge_method": "linear",
        "models": [
            {"model": m["dpo"], "parameters": {"weight": 1.3}},
            {"model": m["sft"], "parameters": {"weight": -0.3}},
        ],
        "parameters": {"normalize": False},
        **_mk_dtype(),
    }


def _mk_dare(m: Dict[str, str]) -> Dict[str, Any]:
    return {
        "merge_method": "dare_linear",
        "base_model": m["sft"],
        "models": [{"model": m["dpo"], "parameters": {"weight": 1.0, "density": 0.1}}],
        **_mk_dtype(),
    }


def _mk_ties(m: Dict[str, str]) -> Dict[str, Any]:
    return {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [
            {"model": m["sft"], "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": m["dpo"], "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        **_mk_dtype(),
    }


CASES: Dict[str, Case] = {
    c.name: c
    for c in [
        Case("expo", ["sft", "dpo"], _wx_one_delta([{"expo": {"alpha": 0.3}}]), _mk_expo,
             note="ExPO alpha=0.3; mergekit: linear 1.3*dpo - 0.3*sft, normalize false"),
        Case("dare", ["sft", "dpo"], _wx_one_delta([{"dare": {"drop": 0.9, "seed": 0}}]), _mk_dare,
             note="DARE drop 0.9 on dpo-sft; mergekit: dare_linear density 0.1"),
        Case("ties", ["base", "sft", "dpo"], _wx_ties, _mk_ties,
             note="TIES density 0.5 over sft-base and dpo-base; mergekit: ties"),
        Case("bitdelta", ["sft", "dpo"], _wx_one_delta([{"bitdelta": {}}], fmt="delta"), None,
             output_format="delta", note="BitDelta 1-bit dpo-sft, written as a delta artifact"),
        Case("ternary", ["sft", "dpo"], _wx_one_delta([{"ternary": {"density": 0.2}}], fmt="delta"),
             None, output_format="delta", note="ternary (ComPEFT) density 0.2, delta artifact"),
    ]
}
DEFAULT_CASES = ["expo", "dare", "ties", "bitdelta", "ternary"]


# --------------------------------------------------------------------------- measuring


def _ppid_map() -> Dict[int, int]:
    out: Dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                s = f.read()
            out[int(entry)] = int(s[s.rfind(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return out


def _tree(root: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for pid, ppid in _ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _status_kb(pid: int, keys=("RssAnon", "VmRSS")) -> Dict[str, int]:
    res: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    res[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return res


class TreeSampler(threading.Thread):
    """Polls RssAnon (and VmRSS) of a process tree; keeps the peak of the sums."""

    def __init__(self, root: int, interval: float = 0.02, rescan_every: int = 5,
                 gpu: bool = False):
        super().__init__(daemon=True)
        self.root, self.interval, self.rescan_every = root, interval, rescan_every
        self.stop_evt = threading.Event()
        self.peak_anon_kb = 0
        self.peak_rss_kb = 0
        self.max_procs = 0
        self.samples = 0
        self.pids: List[int] = [root]
        self.gpu_sampler = GpuSampler(self) if gpu else None

    def run(self) -> None:
        if self.gpu_sampler:
            self.gpu_sampler.start()
        i = 0
        while True:
            if i % self.rescan_every == 0:
                # Cheap enough (~1 ms on a quiet box) but not free: rescan the tree only
                # every few samples; processes that live < 100 ms may be missed.
                self.pids = _tree(self.root)
            anon = rss = 0
            for pid in self.pids:
                st = _status_kb(pid)
                anon += st.get("RssAnon", 0)
                rss += st.get("VmRSS", 0)
            self.peak_anon_kb = max(self.peak_anon_kb, anon)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.max_procs = max(self.max_procs, len(self.pids))
            self.samples += 1
            i += 1
            if self.stop_evt.wait(self.interval):
                break
        if self.gpu_sampler:
            self.gpu_sampler.stop_evt.set()
            self.gpu_sampler.join(timeout=5)


class GpuSampler(threading.Thread):
    """Peak GPU memory of the tree via nvidia-smi (every ~200 ms); best effort."""

    def __init__(self, tree: TreeSampler, interval: float = 0.2):
        super().__init__(daemon=True)
        self.tree, self.interval = tree, interval
        self.stop_evt = threading.Event()
        self.peak_mb = 0
        self.ok = shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        while self.ok and not self.stop_evt.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory",
                     "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5).stdout
                pids = set(self.tree.pids)
                used = 0
                for line in out.splitlines():
                    parts = [p.strip() for p in line.split(",")]
                    if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
                        used += int(float(parts[1]))
                self.peak_mb = max(self.peak_mb, used)
            except (OSError, subprocess.SubprocessError, ValueError):
                self.ok = False
            self.stop_evt.wait(self.interval)


@dataclass
class Run:
    case: str
    tool: str
    repeat: int
    cmd: List[str]
    ok: bool = False
    returncode: Optional[int] = None
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + sys of the whole tree (ru_utime + ru_stime of wait4)
    peak_private_mb: float = 0.0  # max over samples of sum(RssAnon) over the tree
    peak_rss_sum_mb: float = 0.0  # max over samples of sum(VmRSS) over the tree
    maxrss_mb: float = 0.0  # wait4 ru_maxrss: max RSS high-water mark of any process
    peak_gpu_mb: Optional[float] = None
    samples: int = 0
    max_procs: int = 0
    output_bytes: int = 0
    timed_out: bool = False
    stderr_tail: str = ""
    shard_sha256: Optional[List[str]] = None  # from the output's weightx.json (weightx runs that hash)


def _shard_hashes(out: Path) -> Optional[List[str]]:
    """The shards' sha256 a weightx output records (None when it recorded none)."""
    try:
        shards = json.loads((out / "weightx.json").read_text())["output"]["shards"]
        hashes = [s.get("sha256") for s in shards]
        return hashes if all(hashes) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def measure(cmd: List[str], *, cwd: Path, env: Dict[str, str], log: Path,
            timeout: Optional[float], interval: float, gpu: bool) -> Dict[str, Any]:
    with open(log, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = TreeSampler(proc.pid, interval=interval, gpu=gpu)
        sampler.start()
        timed_out = False
        killer = None
        if timeout:
            def _kill() -> None:
                nonlocal timed_out
                timed_out = True
                try:
                    os.killpg(proc.pid, 9)  # our own session: the tool and its children
                except OSError:
                    pass
            killer = threading.Timer(timeout, _kill)
            killer.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if killer:
            killer.cancel()
        sampler.stop_evt.set()
        sampler.join(timeout=10)
    # ru_maxrss is in kB on Linux.
    return {
        "returncode": proc.returncode,
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_private_mb": sampler.peak_anon_kb / 1024,
        "peak_rss_sum_mb": sampler.peak_rss_kb / 1024,
        "maxrss_mb": ru.ru_maxrss / 1024,
        "peak_gpu_mb": (float(sampler.gpu_sampler.peak_mb)
                        if sampler.gpu_sampler and sampler.gpu_sampler.ok else None),
        "samples": sampler.samples,
        "max_procs": sampler.max_procs,
        "timed_out": timed_out,
    }


def _tail(path: Path, n: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


# --------------------------------------------------------------------------- data


def _has_torch(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import torch, safetensors"],
                              capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def generator_python(explicit: Optional[str]) -> str:
    if explicit:
        return explicit
    candidates = [sys.executable, str(REPO / ".venv" / "bin" / "python"),
                  str(DEFAULT_MERGEKIT_VENV / "bin" / "python")]
    for c in candidates:
        if Path(c).exists() and _has_torch(c):
            return c
    raise SystemExit("error: no python with torch and safetensors to run the generator; "
                     "install the project (.venv) or pass --generator-python")


def ensure_data(args: argparse.Namespace) -> Path:
    gen_args = shlex.split(args.generator_args or "")
    if args.data:
        data = Path(args.data).resolve()
    else:
        suffix = ""
        if gen_args:
            suffix = "-" + hashlib.sha1(" ".join(gen_args).encode()).hexdigest()[:8]
        data = HERE / "data" / f"{args.preset}{suffix}"
    want = {"preset": args.preset, "generator_args": gen_args}
    stamp = data / STAMP
    if stamp.exists():
        try:
            have = json.loads(stamp.read_text())
        except ValueError:
            have = {}
        if {k: have.get(k) for k in want} == want and not args.regenerate:
            return data
        print(f"note: {data} was made with {have.get('preset')} {have.get('generator_args')}; "
              "regenerating", file=sys.stderr)
    elif data.exists() and any((data / r / "model.safetensors.index.json").exists()
                               for r in ROLES) and not args.regenerate:
        print(f"note: using checkpoints already in {data} (no {STAMP}; not regenerated)",
              file=sys.stderr)
        return data

    gen = Path(args.generator).resolve()
    py = generator_python(args.generator_python)
    tmp = data.with_name(data.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if gen.exists():
        preset = ["--preset", "default", *SIZE_PRESETS[args.preset]] if args.preset in SIZE_PRESETS \
            else ["--preset", args.preset]
        cmd = [py, str(gen), str(tmp), *preset, *gen_args]
    elif args.preset == "tiny" and not gen_args:
        # A bare clone has no ../shared: the smoke test still runs on weightx's own tiny family
        # (base, sft = base + noise, dpo = sft + noise), which is all the tiny preset is for.
        print(f"note: {gen} not found; tiny checkpoints come from weightx.testing instead", file=sys.stderr)
        code = ("import sys; from weightx.testing import make_related_pair; "
                "make_related_pair(sys.argv[1], with_base=True, max_shard_size='200KB')")
        cmd = [py, "-c", code, str(tmp)]
    else:
        raise SystemExit(f"error: generator {gen} not found; pass --generator PATH "
                         "(shared/bench/gen_checkpoints.py)")
    print(f"generating checkpoints: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    shutil.rmtree(data, ignore_errors=True)
    tmp.rename(data)
    want["seconds"] = round(time.perf_counter() - t0, 1)
    (data / STAMP).write_text(json.dumps(want, indent=2))
    return data


def _shards(model_dir: Path) -> List[Path]:
    return sorted(model_dir.glob("*.safetensors"))


# --------------------------------------------------------------------------- tools


def _parse_size(s: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as huggingface_hub and mergekit count)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B?)\s*", s.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}")
    unit = m.group(2).rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def weightx_command(explicit: Optional[str]) -> Optional[List[str]]:
    if explicit:
        return shlex.split(explicit)
    for cand in (Path(sys.executable).parent / "weightx", REPO / ".venv" / "bin" / "weightx"):
        if cand.exists():
            return [str(cand)]
    found = shutil.which("weightx")
    if found:
        return [found]
    if importlib.util.find_spec("weightx") is not None:
        return [sys.executable, "-m", "weightx"]
    if (REPO / "cli.py").exists():
        return [str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv/bin/python").exists()
                else sys.executable, str(REPO / "cli.py")]
    return None


def mergekit_command(explicit: Optional[str], venv: Path) -> Optional[List[str]]:
    if explicit:
        return shlex.split(explicit)
    cand = venv / "bin" / "mergekit-yaml"
    if cand.exists():
        return [str(cand)]
    return None


def _probe(cmd: List[str], env: Dict[str, str]) -> Optional[str]:
    """None if `cmd --help` works, else the reason."""
    try:
        r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env,
                           timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit {r.returncode}"
    return None


def _version(cmd: List[str], env: Dict[str, str]) -> Optional[str]:
    try:
        r = subprocess.run([*cmd, "--version"], capture_output=True, text=True, env=env,
                           timeout=120)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _mergekit_version(venv: Path) -> Optional[str]:
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", "from importlib.metadata import version as v;"
                        "print(v('mergekit'), v('torch'))"], capture_output=True, text=True)
    return r.stdout.strip() or None


def _yaml(obj: Any) -> str:
    # JSON is valid YAML 1.2 flow style: both tools read these files with yaml.safe_load.
    return json.dumps(obj, indent=2) + "\n"


# --------------------------------------------------------------------------- report


def _median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: List[Run]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    by: Dict[tuple, List[Run]] = {}
    for r in runs:
        by.setdefault((r.case, r.tool), []).append(r)
    for (case, tool), rs in by.items():
        good = [r for r in rs if r.ok]
        walls = [r.wall_s for r in good]
        rows.append({
            "case": case, "tool": tool, "runs": len(rs), "ok_runs": len(good),
            "wall_median_s": _median(walls) if good else None,
            "wall_min_s": min(walls) if good else None,
            "wall_max_s": max(walls) if good else None,
            "cpu_median_s": _median([r.cpu_s for r in good]) if good else None,
            "peak_private_mb": max(r.peak_private_mb for r in good) if good else None,
            "maxrss_mb": max(r.maxrss_mb for r in good) if good else None,
            "peak_gpu_mb": (max(r.peak_gpu_mb for r in good if r.peak_gpu_mb is not None)
                            if any(r.peak_gpu_mb is not None for r in good) else None),
            "output_mb": (_median([r.output_bytes for r in good]) / MB) if good else None,
        })
    for row in rows:
        ref = {t: next((x for x in rows if x["case"] == row["case"] and x["tool"] == t
                        and x["wall_median_s"]), None) for t in ("mergekit", "floor")}
        w = row["wall_median_s"]
        mk, fl = ref["mergekit"], ref["floor"]
        row["wall_vs_mergekit"] = w / mk["wall_median_s"] if (w and mk) else None
        row["mem_vs_mergekit"] = (row["peak_private_mb"] / mk["peak_private_mb"]
                                  if (w and mk and mk["peak_private_mb"]) else None)
        row["wall_vs_floor"] = w / fl["wall_median_s"] if (w and fl) else None
    order = {t: i for i, t in enumerate(TOOLS)}
    rows.sort(key=lambda r: (DEFAULT_CASES.index(r["case"]) if r["case"] in DEFAULT_CASES
                             else 99, order.get(r["tool"].partition("@")[0], 9),
                             int(r["tool"].partition("@")[2] or 0)))
    return rows


def _f(x: Optional[float], fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def markdown(rows: List[Dict[str, Any]], gpu: bool) -> str:
    head = ["case", "tool", "median wall s", "min–max s", "cpu s", "peak private MB",
            "maxrss MB"]
    if gpu:
        head.append("peak GPU MB")
    head += ["wall ×mergekit", "mem ×mergekit", "wall ×floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r["ok_runs"]:
            cells = [r["case"], r["tool"], "failed"] + ["–"] * (len(head) - 3)
        else:
            cells = [r["case"], r["tool"], _f(r["wall_median_s"], ".2f"),
                     f"{r['wall_min_s']:.2f}–{r['wall_max_s']:.2f}",
                     _f(r["cpu_median_s"], ".1f"),
                     _f(r["peak_private_mb"], ".0f") if r["tool"] != "floor" else "–",
                     _f(r["maxrss_mb"], ".0f") if r["tool"] != "floor" else "–"]
            if gpu:
                cells.append(_f(r["peak_gpu_mb"], ".0f"))
            cells += [_f(r["wall_vs_mergekit"], ".2f"),
                      _f(r["mem_vs_mergekit"], ".2f") if r["tool"] != "floor" else "–",
                      _f(r["wall_vs_floor"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="default",
                    help="default (1.29 GB per checkpoint, start-up dominates), small, tiny (smoke "
                         "test) or 7b (13.5 GB per checkpoint; the headline numbers)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per tool and case, interleaved (default 3; 1 for tiny)")
    ap.add_argument("--data", help="checkpoint cache (default benchmarks/data/<preset>[-hash])")
    ap.add_argument("--only", help="comma list of cases: " + ",".join(DEFAULT_CASES))
    ap.add_argument("--tools", default=",".join(DEFAULT_TOOLS),
                    help="comma list of contenders: " + ", ".join(TOOLS) + "; a weightx one may "
                         "end in @N to run on N cores (a thread sweep: weightx@1,weightx@2); "
                         "default " + ",".join(DEFAULT_TOOLS))
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--json", help="write every run and the summary here")
    ap.add_argument("--generator", default=str(DEFAULT_GENERATOR),
                    help="gen_checkpoints.py (default ../shared/bench/ from the repo root)")
    ap.add_argument("--generator-args", default="",
                    help="extra generator options, e.g. '--hidden 4096 --intermediate 11008 "
                         "--layers 32 --heads 32 --kv-heads 32' for a 7B shape")
    ap.add_argument("--generator-python", help="python that runs the generator (needs torch)")
    ap.add_argument("--regenerate", action="store_true", help="ignore the cached checkpoints")
    ap.add_argument("--weightx", help="weightx command (default: the project's venv)")
    ap.add_argument("--weightx-args", default="", help="extra args for `weightx apply`")
    ap.add_argument("--weightx-hash-cache", choices=["cold", "warm"], default="cold",
                    help="cold: every weightx run starts with an empty WEIGHTX_CACHE, so it "
                         "hashes its inputs (provenance) like a first run; warm: one cache for "
                         "the benchmark, primed by an untimed weightx run per case (reruns)")
    ap.add_argument("--mergekit-venv", default=str(DEFAULT_MERGEKIT_VENV))
    ap.add_argument("--mergekit", help="mergekit-yaml command (default: from --mergekit-venv)")
    ap.add_argument("--mergekit-args", default="",
                    help="extra args for mergekit-yaml (e.g. '--read-to-gpu' or '-j 2')")
    ap.add_argument("--mergekit-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="mergekit `dtype` (compute/load dtype; output stays bfloat16)")
    ap.add_argument("--shard-size", default="5GB",
                    help="output shard size for both tools (decimal units; default 5GB)")
    ap.add_argument("--threads", type=int,
                    help="set OMP_NUM_THREADS/MKL_NUM_THREADS for every tool")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per-run limit in seconds")
    ap.add_argument("--interval", type=float, default=0.02, help="memory poll period, s")
    ap.add_argument("--floor-write", choices=["direct", "buffered"], default="direct",
                    help="how the floor writes: direct (O_DIRECT, 8 MB blocks; what weightx does) or "
                         "buffered (through the page cache, no fsync)")
    ap.add_argument("--workdir", help="where outputs go (default: a temp dir beside --data)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (recipes, logs)")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip comparing weightx and mergekit outputs")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.preset == "tiny" else 3
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    args.cases = [c.strip() for c in (args.only or ",".join(DEFAULT_CASES)).split(",") if c.strip()]
    for c in args.cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    args.tool_list = [t.strip() for t in args.tools.split(",") if t.strip()]
    for t in args.tool_list:
        name, _, cores = t.partition("@")
        if name not in TOOLS:
            ap.error(f"unknown tool {t!r}; choose from {', '.join(TOOLS)} (weightx ones may end in "
                     "@N: run on N cores)")
        if cores and (name not in WEIGHTX_TOOLS or not cores.isdigit() or not 0 < int(cores) <= (os.cpu_count() or 1)):
            ap.error(f"{t!r}: @N is for weightx contenders, with 1 <= N <= {os.cpu_count()} cores")
    try:
        args.shard_bytes = _parse_size(args.shard_size)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    MERGEKIT_DTYPE[0] = args.mergekit_dtype
    t_start = time.perf_counter()
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                "TQDM_DISABLE": "1"})
    if args.threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(args.threads)
    gpu = args.device.startswith("cuda")
    notes: List[str] = []

    data = ensure_data(args)
    models = {r: str(data / r) for r in ROLES if (data / r / "model.safetensors.index.json").exists()}

    # Contenders.
    wx_cmd = mk_cmd = None
    wx_tools = [t for t in args.tool_list if t.partition("@")[0] in WEIGHTX_TOOLS]
    if wx_tools:
        wx_cmd = weightx_command(args.weightx)
        why = "not found (install the project into .venv or pass --weightx)" if wx_cmd is None \
            else _probe(wx_cmd, env)
        if why:
            notes.append(f"weightx skipped: {why}")
            wx_cmd = None
    if "mergekit" in args.tool_list:
        mk_cmd = mergekit_command(args.mergekit, Path(args.mergekit_venv))
        why = ("not installed (run benchmarks/setup_mergekit.sh)" if mk_cmd is None
               else _probe(mk_cmd, env))
        if why:
            notes.append(f"mergekit skipped: {why}")
            mk_cmd = None

    env_info = {
        "preset": args.preset, "generator_args": shlex.split(args.generator_args or ""),
        "data": str(data), "repeats": args.repeats, "device": args.device,
        "shard_size": args.shard_size, "threads": args.threads,
        "mergekit_dtype": args.mergekit_dtype, "weightx_hash_cache": args.weightx_hash_cache,
        "floor_write": args.floor_write,
        "host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "weightx_cmd": wx_cmd, "mergekit_cmd": mk_cmd,
        "weightx_version": _version(wx_cmd, env) if wx_cmd else None,
        "mergekit_torch_versions": _mergekit_version(Path(args.mergekit_venv)) if mk_cmd else None,
        "loadavg_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    workdir = Path(tempfile.mkdtemp(prefix="weightx-bench-",
                                    dir=args.workdir or data.parent))
    runs: List[Run] = []
    skipped: Dict[str, str] = {}
    verify: Dict[str, Any] = {}
    failed = False
    wx_extra = shlex.split(args.weightx_args)
    mk_extra = shlex.split(args.mergekit_args)
    try:
        for name in args.cases:
            case = CASES[name]
            missing = [r for r in case.roles if r not in models]
            if missing:
                skipped[name] = f"data has no {', '.join(missing)} checkpoint"
                continue
            cdir = workdir / name
            cdir.mkdir()
            inputs = [p for r in case.roles for p in _shards(Path(models[r]))]
            in_bytes = sum(p.stat().st_size for p in inputs)
            dense_bytes = sum(p.stat().st_size for p in _shards(Path(models["dpo"])))
            # Contender commands for this case.
            cmds: Dict[str, Callable[[Path], List[str]]] = {}
            if wx_cmd:
                for tool in wx_tools:
                    cores = tool.partition("@")[2]

                    def _wx(out: Path, case=case, cdir=cdir, cores=cores) -> List[str]:
                        recipe = cdir / "recipe.yaml"
                        recipe.write_text(_yaml(case.weightx(models, str(out), args.shard_size)))
                        pin = (["taskset", "-c", f"0-{int(cores) - 1}", "env", f"OMP_NUM_THREADS={cores}"]
                               if cores else [])
                        return [*pin, *wx_cmd, "apply", str(recipe), "--output", str(out),
                                "--device", args.device, "--no-validate", "--no-push", *wx_extra]
                    cmds[tool] = _wx
            if mk_cmd and case.mergekit:
                def _mk(out: Path, case=case, cdir=cdir) -> List[str]:
                    cfg = cdir / "mergekit.yaml"
                    cfg.write_text(_yaml(case.mergekit(models)))
                    extra = ["--cuda"] if gpu else []
                    if gpu and ":" in args.device:
                        extra = ["--device", args.device]
                    return [*mk_cmd, str(cfg), str(out), "--no-copy-tokenizer", "--lazy-unpickle",
                            "--out-shard-size", str(args.shard_bytes), "--no-write-model-card",
                            "--quiet", *extra, *mk_extra]
                cmds["mergekit"] = _mk
            out_sizes: List[int] = []
            if "floor" in args.tool_list:
                def _floor(out: Path, case=case) -> List[str]:
                    size = (int(statistics.median(out_sizes))
                            if case.output_format == "delta" and out_sizes else dense_bytes)
                    # Read every input byte, then write an output-sized file: one timed step. The
                    # write is the fastest this machine offers and what weightx does: O_DIRECT from
                    # one buffer, 8 MB at a time (page-cache writes, where dd can't go direct, cost
                    # a kernel copy and, on VMs that hand freed pages back, fresh-page faults).
                    buffered = 'head -c "$SIZE" /dev/zero > "$F"'
                    write = buffered if args.floor_write == "buffered" else (
                        '{ dd if=/dev/zero of="$F" bs=8M count="$SIZE" iflag=count_bytes oflag=direct '
                        f'status=none 2>/dev/null || {buffered}; }}')
                    script = 'cat "$@" > /dev/null && mkdir -p "$OUT" && F="$OUT/model.safetensors" && ' + write
                    if args.floor_write == "direct":
                        size += -size % 4096  # direct writes are whole 4 KiB blocks
                    return ["env", f"OUT={out}", f"SIZE={size}", "bash", "-c", script, "floor",
                            *map(str, inputs)]
                cmds["floor"] = _floor

            if case.output_format == "delta" and not any(t in cmds for t in wx_tools):
                skipped[name] = "weightx-only case and weightx is not available"
                continue
            print(f"\n## {name}: {case.note} — inputs {in_bytes / 1e9:.2f} GB, "
                  f"{len(cmds)} contender(s), {args.repeats} repeat(s)", file=sys.stderr, flush=True)
            # Warm the page cache once (untimed) so no contender pays the cold read alone.
            subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=False)
            case_skip = None
            tool_skip: set = set()
            def warm(tool: str) -> bool:
                base = tool.partition("@")[0]
                return base == "weightx-warm" or (base == "weightx" and args.weightx_hash_cache == "warm")

            warm_tools = [t for t in wx_tools if t in cmds and warm(t)]
            if warm_tools:
                # Untimed warm-up: fills the shared input-hash cache for this case's inputs.
                out = cdir / "out-weightx-warmup"
                wenv = dict(env, WEIGHTX_CACHE=str(workdir / "weightx-cache"))
                r = subprocess.run(cmds[warm_tools[0]](out), cwd=cdir, env=wenv,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                shutil.rmtree(out, ignore_errors=True)
                print(f"  {name:8s} weightx  warm-up run (untimed): rc={r.returncode}",
                      file=sys.stderr)
            keep_for_verify: Dict[str, Path] = {}
            for rep in range(args.repeats):
                for tool in [t for t in args.tool_list if t in cmds]:
                    if case_skip or tool in tool_skip:
                        continue
                    out = cdir / f"out-{tool}-{rep}"
                    cmd = cmds[tool](out)
                    log = cdir / f"{tool}-{rep}.log"
                    renv = env
                    if tool in wx_tools:
                        cache = (workdir / "weightx-cache" if warm(tool)
                                 else cdir / f"weightx-cache-{tool}-{rep}")
                        renv = dict(env, WEIGHTX_CACHE=str(cache))
                        if tool.startswith("weightx-nohash"):
                            renv["WEIGHTX_BENCH_NO_HASH"] = "1"
                        if tool.startswith("weightx-general"):
                            renv["WEIGHTX_FUSED"] = "0"
                    res = measure(cmd, cwd=cdir, env=renv, log=log, timeout=args.timeout,
                                  interval=args.interval, gpu=gpu and tool != "floor")
                    run = Run(case=name, tool=tool, repeat=rep, cmd=cmd, **res)
                    run.ok = run.returncode == 0 and not run.timed_out
                    run.output_bytes = _dir_bytes(out) if out.exists() else 0
                    run.shard_sha256 = _shard_hashes(out) if tool in wx_tools else None
                    if not run.ok:
                        run.stderr_tail = _tail(log)
                        if tool in wx_tools and UNKNOWN_EDIT.search(run.stderr_tail):
                            # A feature weightx does not have yet: skip, don't fail.
                            why = ("weightx does not support this yet: "
                                   + run.stderr_tail.strip().splitlines()[-1].strip()[:200])
                            print(f"  {name:8s} weightx  skipped: {why}", file=sys.stderr)
                            tool_skip.add(tool)
                            if case.mergekit is None:
                                case_skip = why  # weightx-only case: nothing to compare
                                skipped[name] = why
                            else:
                                skipped[f"{name}/weightx"] = why
                            shutil.rmtree(out, ignore_errors=True)
                            continue
                        failed = True
                    elif tool in wx_tools:
                        out_sizes.append(run.output_bytes)
                    runs.append(run)
                    status = "ok" if run.ok else ("TIMEOUT" if run.timed_out
                                                  else f"FAILED rc={run.returncode}")
                    print(f"  {name:8s} {tool:8s} #{rep}: {run.wall_s:7.2f} s  "
                          f"private {run.peak_private_mb:7.0f} MB  maxrss {run.maxrss_mb:7.0f} MB"
                          f"  out {run.output_bytes / 1e9:.3f} GB  {status}",
                          file=sys.stderr, flush=True)
                    if not run.ok:
                        print("    " + run.stderr_tail.strip().replace("\n", "\n    ")[-1500:],
                              file=sys.stderr)
                    last = rep == args.repeats - 1
                    if args.verify and last and run.ok and tool == (wx_tools or [""])[0] \
                            and case.mergekit:
                        keep_for_verify["weightx"] = out  # compared below, then deleted
                    elif args.verify and last and run.ok and tool == "mergekit" and case.mergekit:
                        keep_for_verify[tool] = out  # compared below, then deleted
                    else:
                        shutil.rmtree(out, ignore_errors=True)
                    if len(keep_for_verify) == 2 and name not in verify:
                        # Compared (untimed) and deleted at once: at 7B the two kept outputs
                        # (27 GB) would otherwise leave the next contender no disk to write on.
                        verify[name] = compare_outputs(name, keep_for_verify["weightx"],
                                                       keep_for_verify["mergekit"], models, args)
                        print(f"  {name:8s} verify: {verify[name].get('summary')}", file=sys.stderr)
                        for p in keep_for_verify.values():
                            shutil.rmtree(p, ignore_errors=True)
                    os.sync()  # flush dirty pages now, not during the next contender's run
            for p in keep_for_verify.values():
                shutil.rmtree(p, ignore_errors=True)
    finally:
        if args.keep:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = summarize(runs)
    env_info["loadavg_end"] = os.getloadavg()
    env_info["total_s"] = round(time.perf_counter() - t_start, 1)
    for name, why in skipped.items():
        notes.append(f"{name} skipped: {why}")
    for case in dict.fromkeys(r.case for r in runs):
        hashed = {(r.tool, r.repeat): tuple(r.shard_sha256) for r in runs if r.case == case and r.ok and r.shard_sha256}
        if len(hashed) > 1:
            same = len(set(hashed.values())) == 1
            notes.append(f"{case}: the {len(hashed)} weightx outputs that recorded shard sha256 "
                         + ("are byte-identical (same hashes)" if same else "DIFFER: " + json.dumps(
                             {f"{t}#{r}": h[0][:12] for (t, r), h in hashed.items()})))

    print(f"\n### weightx vs mergekit vs I/O floor — preset `{args.preset}`"
          + (f" ({' '.join(env_info['generator_args'])})" if env_info["generator_args"] else "")
          + f", device {args.device}, {args.repeats} repeat(s), {os.cpu_count()} CPU(s)\n")
    print(markdown(rows, gpu))
    if verify:
        print()
        for name, v in verify.items():
            print(f"- verify {name}: {v.get('summary')}")
    if notes:
        print()
        for n in notes:
            print(f"- note: {n}")
    print(f"\n_peak private = max over time of the sum of RssAnon over the process tree "
          f"(polled every {args.interval * 1000:.0f} ms), max over repeats; maxrss = kernel "
          f"RSS high-water mark (includes mmapped file pages); wall = median; "
          f"load avg {env_info['loadavg_start'][0]:.1f} → {env_info['loadavg_end'][0]:.1f}._")

    if args.json:
        doc = {"env": env_info, "summary": rows, "runs": [asdict(r) for r in runs],
               "skipped": skipped, "notes": notes, "verify": verify}
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 1 if failed else 0


# --------------------------------------------------------------------------- verify

_COMPARE = r"""
import json, sys, torch
from safetensors import safe_open
from pathlib import Path

def tensors(d):
    d = Path(d)
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = (f, k)
    return out

def get(ref):
    with safe_open(str(ref[0]), "pt") as h:
        return h.get_tensor(ref[1]).float()

case, a, b, base = sys.argv[1:5]
A, B, BASE = tensors(a), tensors(b), tensors(base)
res = {"missing_in_weightx": sorted(set(B) - set(A))[:5],
       "missing_in_mergekit": sorted(set(A) - set(B))[:5]}
num = den = 0.0
kept_a = kept_b = n = 0
maxabs = 0.0
per = []
for k in sorted(set(A) & set(B)):
    x, y, z = get(A[k]), get(B[k]), get(BASE[k])
    if x.shape != y.shape:
        res.setdefault("shape_mismatch", []).append(k)
        continue
    maxabs = max(maxabs, (x - y).abs().max().item())
    tn, td = (x - y).double().pow(2).sum().item(), (y - z).double().pow(2).sum().item()
    num += tn
    den += td
    per.append(((tn / td) ** 0.5 if td else (0.0 if tn == 0 else float("inf")), k))
    kept_a += (x != z).sum().item()
    kept_b += (y != z).sum().item()
    n += x.numel()
res.update({"tensors": len(set(A) & set(B)), "max_abs_diff": maxabs,
            "rel_l2_of_delta": (num / den) ** 0.5 if den else None,
            "changed_frac_weightx": kept_a / n if n else None,
            "changed_frac_mergekit": kept_b / n if n else None,
            "worst_tensors": [[k, r] for r, k in sorted(per, reverse=True)[:5]]})
print(json.dumps(res))
"""

_CASE_BASE = {"expo": "sft", "dare": "sft", "ties": "base"}


def compare_outputs(case: str, wx_out: Path, mk_out: Path, models: Dict[str, str],
                    args: argparse.Namespace) -> Dict[str, Any]:
    """Check both tools did the same work (untimed). Deterministic cases (expo, ties) should
    agree to bf16 rounding; for DARE the random masks differ, so compare how much changed."""
    try:
        py = generator_python(args.generator_python)
        r = subprocess.run([py, "-c", _COMPARE, case, str(wx_out), str(mk_out),
                            models[_CASE_BASE[case]]],
                           capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            return {"summary": "comparison failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]}
        res = json.loads(r.stdout)
    except (OSError, subprocess.SubprocessError, ValueError, SystemExit) as e:
        return {"summary": f"comparison failed: {e}"}
    rel = res.get("rel_l2_of_delta")
    res["summary"] = (f"{res['tensors']} tensors; ‖weightx−mergekit‖/‖mergekit−{_CASE_BASE[case]}‖ "
                      f"= {_f(rel, '.3g')}; max |diff| {res['max_abs_diff']:.3g}; changed "
                      f"{_f(res['changed_frac_weightx'], '.3f')} (weightx) vs "
                      f"{_f(res['changed_frac_mergekit'], '.3f')} (mergekit)")
    if res["missing_in_weightx"] or res["missing_in_mergekit"]:
        res["summary"] += (f"; names differ: {res['missing_in_weightx']} / "
                           f"{res['missing_in_mergekit']}")
    return res


if __name__ == "__main__":
    sys.exit(main())
