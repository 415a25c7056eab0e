"""Running a plan: the pre-run phases, the engine on this rank's shards, the record, the atomic swap.

`execute(plan)` is the only entry: it builds a fresh `RunState` (distilled scales, global ternary
selections), derives the final plan from it when a phase changes the layout, writes the shards into
a temporary sibling of the output (resuming a killed run's verified shards), records everything
in `weightx.json` and renames the folder into place. Under torchrun every rank writes its share.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from weightx.errors import InputError, RankFailed, UsageError, WeightxError
from weightx.io.output import discard, finalize, keep_beside, write_failed, write_json
from weightx.io.provenance import Hasher, Pacer
from weightx.pipeline.card import render_card
from weightx.pipeline.compute import TensorStats, pick_device
from weightx.pipeline.distill import distill_plan
from weightx.pipeline.distributed import Dist, assign, detect
from weightx.pipeline.engine import write_shards
from weightx.pipeline.lora import ADAPTER_FILE, write_lora
from weightx.pipeline.sparse_output import is_sparse, write_sparse
from weightx.pipeline.global_ternary import prepare as global_statistics
from weightx.pipeline.global_ties import prepare as global_ties
from weightx.pipeline.plan import Plan
from weightx.pipeline.record import write_record
from weightx.pipeline.resume import ResumeLog, clear, fingerprint, start_output
from weightx.pipeline.state import RunState


@dataclass
class ApplyResult:
    path: Path
    total_size: int
    shards: list[str]
    tensors: dict[str, dict] = field(default_factory=dict)  # per-tensor stats
    seconds: float = 0.0
    plan: Plan | None = None  # the plan as run (a pre-run phase may have fixed its layout)
    extra: dict[str, Any] = field(default_factory=dict)


def _progress_bar(total: int, enabled: bool | None) -> tuple[Callable[[int], None], Callable[[], None]]:
    from tqdm import tqdm  # only a run that shows progress needs it

    # enabled=None: show the bar only on a terminal.
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="weightx",
               disable=None if enabled is None else not enabled, leave=False)
    return bar.update, bar.close


def _preload(module: str) -> None:
    """Import `module` on a background thread (import locks make this safe): its cost overlaps the
    stream instead of adding to the end of the run. Any error resurfaces at the real import."""

    def run() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module(module)

    threading.Thread(target=run, name="weightx-preload", daemon=True).start()


def _input_files(plan: Plan, shards: list) -> set[Path]:
    """The local input files the tensors of `shards` read."""
    files = set()
    for shard in shards:
        for t in shard.tensors:
            for src in plan.reads(t):
                if src.kind != "hub" and t.name in src.weight_map:
                    files.add(src.headers[src.weight_map[t.name]].path)
    return files


def identities(files: set[Path] | list[Path]) -> dict[Path, tuple[int, int, int, int] | None]:
    """What tells a rewritten file apart: size, mtime, ctime (set by any write) and inode."""
    out: dict[Path, tuple[int, int, int, int] | None] = {}
    for p in files:
        try:
            st = p.stat()
            out[p] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        except OSError:
            out[p] = None
    return out


def _distill(plan: Plan, dev: torch.device, ranks: Dist, state: RunState, log: Callable[[str], None]) -> None:
    """Train BitDelta scales once, on rank 0, and give every rank the same learned values: ranks
    distilling on their own could disagree (GPU nondeterminism) and write inconsistent shards."""
    edits = [e for d in plan.recipe.deltas for e in d.edits if e.prepass() == "distill"]
    if not edits:
        return

    def run() -> list:
        distill_plan(plan, dev, state, log)
        return [({k: v.detach().cpu() for k, v in state.per_tensor[id(e)].items()}, state.records["distill"][n])
                for n, e in enumerate(edits)]

    shared = ranks.on_main(run)
    if not ranks.is_main:
        for e, (learned, record) in zip(edits, shared):
            state.learn(e, {k: v.to(dev) for k, v in learned.items()}, "distill", record)


def execute(plan: Plan, *, device: str = "auto", overwrite: bool = False, progress: bool | None = None,
            accept: Callable[[Path], bool] | None = None, log: Callable[[str], None] = lambda m: None) -> ApplyResult:
    """Run a plan to a finished output folder; under torchrun, each rank writes its share of shards.

    `accept(folder)` (rank 0; validation and its gates) sees the complete candidate before it
    replaces anything: a rejected candidate never replaces a previous output, it is kept beside it
    (`result.extra["rejected"]`); with no previous output it becomes the output, marked as it is."""
    t0 = time.perf_counter()
    ranks = detect()
    lora = plan.recipe.output.format == "lora"
    # LoRA ranks by energy and sparse parts are sized by the compute: their files are laid out after it,
    # by one process, without the shard-by-shard resume log.
    laid_out_after = lora or is_sparse(plan.recipe)
    if ranks.active and laid_out_after:
        raise UsageError(f"output.format: {plan.recipe.output.format} of {'a LoRA adapter' if lora else 'sparse edits'}"
                         " is written by one process; run it without torchrun")
    dev = pick_device(device)
    if dev.type == "cuda" and ranks.active and dev.index is None:
        dev = torch.device(f"cuda:{ranks.local_rank % max(1, torch.cuda.device_count())}")
    state = RunState()
    plan = global_statistics(plan, dev, state)  # may resize planned parts and shards
    global_ties(plan, dev, state)
    mine = [plan.shards[i] for i in assign([s.nbytes for s in plan.shards], ranks.world)[ranks.rank]]
    # Each input file is hashed by the lowest rank that reads it, so no rank reads more than it needs.
    needs = ranks.gather(sorted(str(p) for p in _input_files(plan, mine)))
    owners = ranks.broadcast({f: r for r in reversed(range(len(needs))) for f in needs[r]} if ranks.is_main else None)
    pacer = Pacer()  # the input hashes follow the engine's reads
    hasher = Hasher(sorted(Path(f) for f, r in owners.items() if r == ranks.rank), pacer)
    before = identities(_input_files(plan, mine))
    fp = fingerprint(plan, dev.type)
    held = contextlib.ExitStack()  # rank 0's output lock; released in the last finally
    try:
        tmp_name, adopted = ranks.on_main(lambda: start_output(plan.out_path, overwrite, held, fp, {s.filename for s in plan.shards}))
        tmp = Path(tmp_name)
        resume = ResumeLog(plan, tmp, fp, ranks.rank, adopted)  # shards finished by a killed run were verified and kept
    except BaseException:
        pacer.release()  # no hash thread waits for reads that will not come
        raise
    close_bar: Callable[[], None] = lambda: None  # noqa: E731
    error: BaseException | None = None
    stats: dict[str, TensorStats] = {}
    hashes: dict[str, str] = {}
    mine_written: dict[str, dict] = resume.shards if not laid_out_after else {}  # shard file → its sha256 and size
    try:
        _distill(plan, dev, ranks, state, log if ranks.is_main else lambda m: None)  # before any writing
        # The bar starts with the stream: over the distillation it would show a stalled ETA.
        update, close_bar = _progress_bar(sum(s.nbytes for s in mine), progress if ranks.is_main else False)
        if os.environ.get("WEIGHTX_TEST_FAIL_RANK") == str(ranks.rank) and ranks.active:
            raise RuntimeError(f"injected failure on rank {ranks.rank}")  # for the scale-out tests
        if ranks.is_main:
            _preload("huggingface_hub.repocard")  # the card needs it at the end; import while streaming
        try:
            if lora:  # one adapter file, its ranks known only after each SVD
                stats, facts = write_lora(plan, tmp, dev, state)
                state.records["lora"] = [{k: v for k, v in facts.items() if k not in ("sha256", "size")}]
                mine_written = {ADAPTER_FILE: {"sha256": facts["sha256"], "size": facts["size"]}}
            elif laid_out_after:  # sparse: the shard layout follows the counts of changed entries
                plan, stats, mine_written = write_sparse(plan, tmp, dev, state, update)
            else:
                stats = write_shards(plan, tmp, dev, update, shards=[s for s in mine if s.filename not in adopted], on_shard=resume.add,
                                     run=state, pacer=pacer)
        finally:
            pacer.release()  # what is left to hash (files of resumed shards) goes at full speed
        stats.update(resume.stats({s.filename for s in mine} & set(adopted)))
        hashes = hasher.result()
        changed = [p for p, ident in before.items() if identities([p]).get(p) != ident]
        if changed:  # the shards mix old and new bytes, and the record's hashes describe neither
            raise InputError(f"{changed[0]} changed while weightx read it{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''};"
                             " nothing was written: rerun once the inputs are final")
    except BaseException as e:
        error = e
    finally:
        pacer.release()
        close_bar()
    doc: dict = {}
    final, accepted = plan.out_path, True
    try:
        if not ranks.all_ok(error is None):
            if ranks.is_main and not isinstance(error, KeyboardInterrupt):  # Ctrl-C keeps finished shards to resume
                discard(tmp)
            if error is not None:
                raise _user_error(error, plan.out_path, tmp)
            raise RankFailed("another rank failed; nothing was written (see its error above)")
        parts = ranks.gather((stats, hashes, mine_written))
        if ranks.is_main:
            all_stats = {k: v for st, _, _ in parts for k, v in st.items()}
            all_hashes = {k: v for _, hs, _ in parts for k, v in hs.items()}
            written = {k: v for _, _, sh in parts for k, v in sh.items()}
            try:
                where = str(dev) if not ranks.active else f"{dev.type} ×{ranks.world} ranks"
                doc = write_record(plan, tmp, all_stats, all_hashes, where, time.perf_counter() - t0, state)
                for entry in doc["output"]["shards"]:  # hashed while written: `weightx verify` checks them
                    entry["sha256"] = written[entry["file"]]["sha256"]
                (tmp / "README.md").write_text(render_card(plan, doc), encoding="utf-8")  # from the record: has the hashes
                write_json(tmp / "weightx.json", doc)  # last: its presence marks the folder complete
                clear(tmp)
                accepted = accept is None or accept(tmp)  # decided before the swap
                if accepted or not plan.out_path.exists():
                    finalize(tmp, plan.out_path)
                    final = plan.out_path
                else:
                    final = keep_beside(tmp, plan.out_path)
            except BaseException as e:
                discard(tmp)
                raise _user_error(e, plan.out_path, tmp)
        done = ranks.broadcast(bool(doc))
        if not done:
            raise RankFailed("rank 0 failed to finish the output; nothing was written")
    finally:
        ranks.close()
        held.close()
    result = ApplyResult(final, plan.total_size, [s.filename for s in plan.shards], doc.get("tensors", {}),
                         doc.get("seconds", round(time.perf_counter() - t0, 3)), plan)
    if adopted:
        result.extra["resumed"] = sorted(adopted)
    if not accepted:
        result.extra["rejected"] = final != plan.out_path  # True: kept beside the untouched previous output
    return result


def _user_error(e: BaseException, out_path: Path, tmp: Path) -> BaseException:
    """A full disk, quota or size limit while writing the output is one line, not a traceback."""
    if isinstance(e, OSError) and not isinstance(e, WeightxError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS) or str(tmp) in str(e.filename or ""):
            return write_failed(out_path, e)
    return e
