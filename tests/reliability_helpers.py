"""Helpers for the hostile-input, reliability and fuzz tests.

`Zygote` is a Python process that imports weightx (and torch) once, then forks a child per request
that runs the real `weightx` CLI entry point with its own stdout/stderr files, environment and limits.
Each child is a separate process (it can be SIGKILLed, hold a lock, hit a file-size limit) that
starts in milliseconds instead of the seconds a fresh interpreter needs to import torch. A child is
not reaped until the test asks, so its pid cannot be reused while the test may still signal it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]

ZYGOTE_SRC = r"""
import json, os, resource, signal, sys, traceback
import importlib
import weightx.api, weightx.cli, weightx.io.lock, weightx.pipeline.resume, weightx.io.staging, weightx.io.verify  # torch, once
for name in ("tqdm", "huggingface_hub", "weightx.pipeline.card", "weightx.io.artifact", "weightx.pipeline.distributed",
             "weightx.validate.sweep", "weightx.inspect"):  # imported lazily by a run: pay for them once
    try:
        importlib.import_module(name)
    except ImportError:
        pass

reply = sys.stdout
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "run":
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for fd, name in ((1, req["stdout"]), (2, req["stderr"])):
                    f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                os.environ.update(req.get("env") or {})
                os.chdir(req["cwd"])
                # Ctrl-C as at a terminal, even when the test run itself was started in the
                # background (a non-interactive shell starts background jobs with SIGINT ignored).
                signal.signal(signal.SIGINT, signal.default_int_handler)
                if req.get("fsize") is not None:
                    # ignore SIGXFSZ so that exceeding the limit is an EFBIG error, like a full disk
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
                try:
                    weightx.cli.main(args=req["args"], prog_name="weightx")
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        reply.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()
"""


@dataclass
class Run:
    code: int  # exit status, or -signal
    stdout: str
    stderr: str


def _read(path: Path) -> str:
    # A child killed right after the fork may die before it opens its capture files.
    return path.read_text(errors="replace") if path.exists() else ""


class Zygote:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.n = 0
        # own hash/staging cache: killed runs must not litter (or read) the developer's ~/.cache/weightx
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "default",
               "WEIGHTX_CACHE": str(workdir / "cache")}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE_SRC], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=REPO, env=env)
        self.run("--version")  # wait for the imports, so that timings taken by tests exclude them

    def _ask(self, req: dict) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("zygote died")
        return json.loads(line)

    def start(self, *args: str, env: dict | None = None, fsize: int | None = None, cwd: Path | None = None) -> tuple[int, Path, Path]:
        """Fork a `weightx ARGS` child; returns (pid, stdout file, stderr file)."""
        self.n += 1
        out, err = self.workdir / f"run{self.n}.out", self.workdir / f"run{self.n}.err"
        reply = self._ask({"op": "run", "args": list(args), "stdout": str(out), "stderr": str(err),
                           "env": env or {}, "fsize": fsize, "cwd": str(cwd or REPO)})
        return reply["pid"], out, err

    def wait(self, pid: int, out: Path, err: Path) -> Run:
        code = self._ask({"op": "wait", "pid": pid})["code"]
        return Run(code, _read(out), _read(err))

    def run(self, *args: str, **kw) -> Run:
        return self.wait(*self.start(*args, **kw))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ---- tiny checkpoints -------------------------------------------------------------------------


def tiny_tensors(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(32, 16, generator=g).to(dtype),
        "model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=g).to(dtype),
        "model.layers.0.input_layernorm.weight": torch.ones(16, dtype=dtype),
        "model.layers.0.step": torch.tensor([3], dtype=torch.int64),
    }


def write_model(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1, config: dict | None = None) -> Path:
    """A model folder: model.safetensors, or `shards` files plus an index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({n: tensors[n].contiguous() for n in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def make_pair(root: Path, shards: int = 1, dtype: torch.dtype = torch.bfloat16) -> tuple[Path, Path]:
    base = tiny_tensors(0, dtype)
    g = torch.Generator().manual_seed(1)
    model = {k: (v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v.clone()
             for k, v in base.items()}
    return write_model(root / "base", base, shards), write_model(root / "model", model, shards)


def recipe(base: Path, model: Path, out: Path, alpha: float = 0.3, **output) -> dict:
    return {
        "models": {"base": str(base), "model": str(model)},
        "base": "base",
        "deltas": [{"model": "model", "edits": [{"expo": {"alpha": alpha}}]}],
        "output": {"path": str(out), **output},
    }


def write_recipe(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# ---- raw safetensors surgery ------------------------------------------------------------------


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_file(path: Path, header: dict | bytes, data: bytes) -> None:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
