"""The Python API: `weightx.apply(recipe)` and its result."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from weightx import __version__
from weightx.card import render_card
from weightx.engine import TensorStats, pick_device, write_shards
from weightx.output import copy_config, discard, finalize, write_json
from weightx.plan import Plan, build_plan
from weightx.provenance import Hasher
from weightx.recipe import Recipe, load_recipe
from weightx.safetensors_io import DTYPES


@dataclass
class ApplyResult:
    path: Path
    total_size: int
    shards: list[str]
    tensors: dict[str, dict] = field(default_factory=dict)  # per-tensor stats
    seconds: float = 0.0
    plan: Plan | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _dtype_name(code: str) -> str:
    return str(DTYPES[code]).removeprefix("torch.")


def _inputs_record(plan: Plan, hashes: dict[str, str]) -> dict:
    record = {}
    for alias, src in plan.sources.items():
        files = {}
        for shard, header in src.headers.items():
            files[shard] = {"size": header.path.stat().st_size, "sha256": src.sha256.get(shard) or hashes.get(str(header.path))}
        record[alias] = {"source": src.spec, "kind": src.kind, "repo_id": src.repo_id, "revision": src.revision, "files": files}
    return record


def _progress_bar(total: int, enabled: bool | None) -> tuple[Callable[[int], None], Callable[[], None]]:
    from tqdm import tqdm

    # enabled=None: show the bar only on a terminal.
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="weightx",
               disable=None if enabled is None else not enabled, leave=False)
    return bar.update, bar.close


def _preload(module: str) -> None:
    """Import `module` on a background thread (import locks make this safe): its cost overlaps the
    stream instead of adding to the end of the run. Any error resurfaces at the real import."""
    import importlib
    import threading

    def run() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module(module)

    threading.Thread(target=run, name="weightx-preload", daemon=True).start()


def _input_files(plan: Plan, shards: list) -> set[Path]:
    """The local input files the tensors of `shards` read."""
    files = set()
    for shard in shards:
        for t in shard.tensors:
            srcs = [plan.base] + [s for _, s in plan.deltas] if t.edit else [plan.config_source]
            for src in srcs:
                if src.kind != "hub" and t.name in src.weight_map:
                    files.add(src.headers[src.weight_map[t.name]].path)
    return files


def _record(plan: Plan, tmp: Path, stats: dict[str, TensorStats], hashes: dict[str, str], dev: str, seconds: float) -> dict:
    """Everything after the shards: config, index, weightx.json content, card. Runs on one rank."""
    r = plan.recipe
    out_dtypes = {t.out_dtype for t in plan.tensors if t.edit}
    cfg_dtype = _dtype_name(next(iter(out_dtypes))) if len(out_dtypes) == 1 else None
    if plan.config_source.has_config:
        copy_config(plan.config_source.root, tmp, cfg_dtype)
    weight_map = {o.name: s.filename for s in plan.shards for t in s.tensors for o in t.outs}
    write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": plan.total_size}, "weight_map": dict(sorted(weight_map.items()))})
    recipe_form = r.recipe_form()
    recipe_form.setdefault("output", {})["path"] = str(plan.out_path)
    doc = {
        "weightx_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "status": "complete",
        "recipe": recipe_form,
        "inputs": _inputs_record(plan, hashes),
        "output": {
            "format": r.output.format,
            "dtype": cfg_dtype or sorted(_dtype_name(c) for c in out_dtypes),
            "total_size": plan.total_size,
            "shards": [{"file": s.filename, "size": (tmp / s.filename).stat().st_size, "tensors": len(s.tensors)} for s in plan.shards],
            "tensor_count": len(plan.tensors),
            "parameter_count": plan.parameter_count,
        },
        "device": dev,
        "seconds": round(seconds, 3),
        "tensors": {k: v.as_dict() for k, v in sorted(stats.items())},
    }
    from weightx.delta_artifact import finish_record  # artifact base check, delta encoding record, distill losses

    finish_record(plan, doc, stats, hashes)
    return doc


def _distill(plan: Plan, dev: Any, ranks: Any) -> None:
    """Train BitDelta scales once, on rank 0, and give every rank the same learned values: ranks
    distilling on their own could disagree (GPU nondeterminism) and write inconsistent shards."""
    edits = [e for d in plan.recipe.deltas for e in d.edits if getattr(e, "distill", None) is not None]
    if not edits:
        return

    def run() -> list:
        from weightx.distill import distill_plan

        distill_plan(plan, dev)
        return [({k: v.detach().cpu() for k, v in e._learned.items()}, e._distill_record) for e in edits]

    shared = ranks.on_main(run)
    if not ranks.is_main:
        for e, (learned, record) in zip(edits, shared):
            e._learned.clear()
            e._learned.update({k: v.to(dev) for k, v in learned.items()})
            e._distill_record = record


def execute(plan: Plan, *, device: str = "auto", overwrite: bool = False, progress: bool | None = None) -> ApplyResult:
    """Run a plan to a finished output folder; under torchrun, each rank writes its share of shards."""
    from weightx.distributed import RankFailed, assign, detect

    t0 = time.perf_counter()
    ranks = detect()
    dev = pick_device(device)
    if dev.type == "cuda" and ranks.active and dev.index is None:
        dev = torch.device(f"cuda:{ranks.local_rank % max(1, torch.cuda.device_count())}")
    from weightx.global_ternary import prepare  # global ternary statistics: may resize planned parts and shards

    prepare(plan, dev)
    mine = [plan.shards[i] for i in assign([s.nbytes for s in plan.shards], ranks.world)[ranks.rank]]
    # Each input file is hashed by the lowest rank that reads it, so no rank reads more than it needs.
    needs = ranks.gather(sorted(str(p) for p in _input_files(plan, mine)))
    owners = ranks.broadcast({f: r for r in reversed(range(len(needs))) for f in needs[r]} if ranks.is_main else None)
    hasher = Hasher(sorted(Path(f) for f, r in owners.items() if r == ranks.rank))
    from weightx.resume import ResumeLog, clear, fingerprint, start_output

    fp = fingerprint(plan, dev.type)
    held = contextlib.ExitStack()  # rank 0's output lock; released in the last finally
    tmp_name, adopted = ranks.on_main(lambda: start_output(plan.out_path, overwrite, held, fp, {s.filename for s in plan.shards}))
    tmp = Path(tmp_name)
    log = ResumeLog(plan, tmp, fp, ranks.rank, adopted)  # shards finished by a killed run were verified and kept
    update, close_bar = _progress_bar(sum(s.nbytes for s in mine), progress if ranks.is_main else False)
    error: BaseException | None = None
    stats: dict[str, TensorStats] = {}
    hashes: dict[str, str] = {}
    try:
        _distill(plan, dev, ranks)  # BitDelta scale distillation, before any writing
        if os.environ.get("WEIGHTX_TEST_FAIL_RANK") == str(ranks.rank) and ranks.active:
            raise RuntimeError(f"injected failure on rank {ranks.rank}")  # for the scale-out tests
        if ranks.is_main:
            _preload("huggingface_hub.repocard")  # the card needs it at the end; import while streaming
        stats = write_shards(plan, tmp, dev, update, shards=[s for s in mine if s.filename not in adopted], on_shard=log.add)
        stats.update(log.stats({s.filename for s in mine} & set(adopted)))
        hashes = hasher.result()
    except BaseException as e:
        error = e
    finally:
        close_bar()
    doc: dict = {}
    try:
        if not ranks.all_ok(error is None):
            if ranks.is_main and not isinstance(error, KeyboardInterrupt):  # Ctrl-C keeps finished shards to resume
                discard(tmp)
            if error is not None:
                raise _user_error(error, plan.out_path, tmp)
            raise RankFailed("another rank failed; nothing was written (see its error above)")
        parts = ranks.gather((stats, hashes, log.shards))
        if ranks.is_main:
            all_stats = {k: v for st, _, _ in parts for k, v in st.items()}
            all_hashes = {k: v for _, hs, _ in parts for k, v in hs.items()}
            written = {k: v for _, _, sh in parts for k, v in sh.items()}
            try:
                doc = _record(plan, tmp, all_stats, all_hashes, str(dev) if not ranks.active else f"{dev.type} ×{ranks.world} ranks", time.perf_counter() - t0)
                for entry in doc["output"]["shards"]:  # hashed while written: `weightx verify` checks them
                    entry["sha256"] = written[entry["file"]]["sha256"]
                (tmp / "README.md").write_text(render_card(plan, doc), encoding="utf-8")  # from the record: has the hashes
                write_json(tmp / "weightx.json", doc)  # last: its presence marks the folder complete
                clear(tmp)
                finalize(tmp, plan.out_path)
            except BaseException as e:
                discard(tmp)
                raise _user_error(e, plan.out_path, tmp)
        done = ranks.broadcast(bool(doc))
        if not done:
            raise RankFailed("rank 0 failed to finish the output; nothing was written")
    finally:
        ranks.close()
        held.close()
    result = ApplyResult(plan.out_path, plan.total_size, [s.filename for s in plan.shards], doc.get("tensors", {}),
                         doc.get("seconds", round(time.perf_counter() - t0, 3)), plan)
    if adopted:
        result.extra["resumed"] = sorted(adopted)
    return result


def _user_error(e: BaseException, out_path: Path, tmp: Path) -> BaseException:
    """A full disk, quota or size limit while writing the output is one line, not a traceback."""
    import errno

    from weightx.errors import WeightxError
    from weightx.output import write_failed

    if isinstance(e, OSError) and not isinstance(e, WeightxError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS) or str(tmp) in str(e.filename or ""):
            return write_failed(out_path, e)
    return e


def apply(
    recipe: Recipe | str | Path | dict,
    *,
    output: str | Path | None = None,
    device: str = "auto",
    overrides: list[str] | tuple[str, ...] = (),
    overwrite: bool = False,
    progress: bool | None = False,
    push: bool = True,
    validate: bool = True,
) -> ApplyResult:
    """Run a recipe (object, YAML path or dict) and return where the output went and its stats.

    With a `validate:` block the output is then evaluated (`validate=False` skips it; a list-valued
    parameter is a sweep, evaluated in memory before only the winner is written); `result.extra`
    gets "validation" (and "sweep"), and a failed gate raises `GateFailed` with the output kept.
    With a `push:` block the output is then published to the Hub (`push=False` skips it)."""
    recipe_dir = Path(recipe).parent if isinstance(recipe, (str, Path)) else None
    r = load_recipe(recipe, overrides)
    sweep = tasks = None
    if r.sweep is not None:
        from weightx.validate.report import run_recipe_sweep

        r, sweep, tasks = run_recipe_sweep(r, output=output, recipe_dir=recipe_dir, device=device, validate=validate)
    plan = build_plan(r, output, recipe_dir)
    if validate and r.validate_ is not None and tasks is None:
        from weightx.validate.tasks import load_tasks, resolve_tasks

        # An unknown task or one whose data is offline stops the run before any compute.
        tasks = load_tasks(resolve_tasks(r.validate_.tasks, recipe_dir))
    result = execute(plan, device=device, overwrite=overwrite, progress=progress)
    if validate and r.validate_ is not None:
        from weightx.validate.report import GateFailed, validate_output

        v = validate_output(plan, path=result.path, recipe_dir=recipe_dir, device=device, sweep=sweep, tasks=tasks)
        result.extra["validation"] = v.as_record()
        if sweep is not None:
            result.extra["sweep"] = sweep.as_record()
        if not v.passed:
            raise GateFailed(v, result.path)
    if push and r.push is not None:  # keep last: publish only after apply (and validation) succeeded
        from weightx.publish import push_spec

        result.extra["push"] = push_spec(result.path, r.push).as_dict()
    return result


def plan(recipe: Recipe | str | Path | dict, *, output: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    recipe_dir = Path(recipe).parent if isinstance(recipe, (str, Path)) else None
    return build_plan(load_recipe(recipe, overrides), output, recipe_dir)


def read_weightx_json(path: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((path / "weightx.json").read_text(encoding="utf-8"))
    return None
