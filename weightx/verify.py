"""Integrity checks: finite values in what the engine computes, and `weightx verify PATH`.

Finiteness is checked on the computed output, one reduction per block (see engine.TensorComputer),
never by a separate pass over the inputs; only when a block fails are the inputs of that block
re-read to name the one holding the NaN/Inf. So a non-finite input value that an edit discards (an
entry that DARE drops, or that magnitude/TIES/ternary prune) is not reported: it cannot reach the
output. Multiplying by zero does not hide one (NaN·0 is NaN).

`verify` re-hashes an output's shards against the sha256 recorded in its weightx.json, which the
writer computed while writing them.
"""

from __future__ import annotations

import json
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightx.errors import InputError, UsageError, WeightxError


_COUNT_LOCK = threading.Lock()  # blocks of one tensor may be computed on several threads


class NonFiniteWarning(UserWarning):
    """A NaN/Inf was written because the recipe says `output.on_nonfinite: warn`."""


def _first_bad(x: Any) -> tuple[int, int, float] | None:
    """(count, first flat index, first value) of the non-finite entries of x, or None."""
    import torch

    bad = ~torch.isfinite(x.reshape(-1))
    n = int(bad.sum())
    if not n:
        return None
    i = int(torch.nonzero(bad)[0])
    return n, i, float(x.reshape(-1)[i])


def nonfinite_block(computer: Any, t: Any, start: int, count: int, out: Any, stats: Any) -> None:
    """Called when a computed block's sum is not finite: confirm, find the culprit, warn or raise."""
    found = _first_bad(out)
    if found is None:
        return  # a finite block whose sum overflowed
    n, i, value = found
    plan = computer.plan
    culprits = []
    for alias, src in [(plan.recipe.base, plan.base)] + [(d.model, s) for d, s in plan.deltas]:
        if getattr(src, "artifact", None) is not None and src.artifact.is_compressed(t.name):
            continue
        bad = _first_bad(computer._load(src, t, start, count))
        if bad is not None:
            culprits.append((alias, src.path_of(src.weight_map[t.name]), bad))
    if culprits:
        alias, path, (m, j, v) = culprits[0]
        what = f"{path}: tensor {t.name!r} of '{alias}' holds {v} at index {start + j}"
        if m > 1:
            what += f" ({m} NaN/Inf values in elements {start}..{start + count - 1})"
        if len(culprits) > 1:
            what += f", and so does '{culprits[1][0]}'"
    else:
        what = (f"output tensor {t.name!r} becomes {value} at index {start + i} although its inputs are finite: the"
                f" recipe's weights or edit parameters overflow {str(out.dtype).removeprefix('torch.')}")
    if plan.recipe.output.on_nonfinite == "warn":
        first = True
        if stats is not None:
            with _COUNT_LOCK:
                first = "nonfinite" not in stats.extra
                stats.extra["nonfinite"] = stats.extra.get("nonfinite", 0) + n
        if first:  # one line per tensor; the total goes to weightx.json
            warnings.warn(f"{what}; written anyway (output.on_nonfinite: warn)", NonFiniteWarning, stacklevel=2)
        return
    fix = "re-download or repair that checkpoint" if culprits else "lower them"
    err = InputError if culprits else UsageError
    raise err(f"{what}; {fix}, or set output.on_nonfinite: warn to write NaN/Inf values anyway")


# ---- weightx verify ---------------------------------------------------------------------------


@dataclass
class VerifyResult:
    path: Path
    ok: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # one line per problem

    @property
    def passed(self) -> bool:
        return not self.bad


def verify(path: str | Path) -> VerifyResult:
    """Re-hash every shard of a weightx output against its weightx.json; problems are listed, not raised."""
    from weightx.provenance import sha256_file

    folder = Path(path)
    record = folder / "weightx.json"
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; give the path of a weightx output")
    try:
        doc = json.loads(record.read_text(encoding="utf-8"))
        shards = doc["output"]["shards"]
        if not isinstance(shards, list):
            raise TypeError
    except FileNotFoundError:
        raise InputError(f"{folder} has no weightx.json: it is not a complete weightx output (an interrupted run leaves nothing there)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{record}: unreadable or not a weightx record; the folder cannot be verified") from None
    result = VerifyResult(folder)
    for entry in shards:
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            result.bad.append(f"weightx.json lists a bad shard entry {entry!r}")
            continue
        want = entry.get("sha256")
        f = folder / name
        if not f.is_file():
            result.bad.append(f"{name}: missing")
        elif not isinstance(want, str):
            result.bad.append(f"{name}: weightx.json records no sha256 for it (written by an older weightx); cannot verify")
        elif f.stat().st_size != entry.get("size", f.stat().st_size):
            result.bad.append(f"{name}: size {f.stat().st_size} bytes, weightx.json says {entry.get('size')}")
        else:
            got = sha256_file(f)
            if got == want:
                result.ok.append(name)
            else:
                result.bad.append(f"{name}: sha256 {got[:16]}… does not match the recorded {want[:16]}…")
    if not shards:
        result.bad.append("weightx.json lists no shards")
    return result


def render_verify(r: VerifyResult) -> str:
    if r.passed:
        return f"OK {r.path}: {len(r.ok)} shard(s) match the sha256 in weightx.json"
    return "\n".join([f"FAILED {r.path}: {len(r.bad)} problem(s)"] + [f"  {line}" for line in r.bad])


class VerifyFailed(WeightxError):
    """`weightx verify` found a mismatch (the report is printed on stdout)."""
