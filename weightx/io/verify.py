"""`weightx verify PATH`: `verify` re-hashes an output's shards against the sha256 recorded in its weightx.json, which the
writer computed while writing them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from weightx.errors import InputError, UsageError
from weightx.io.provenance import sha256_file


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
            result.bad.append(f"{name}: weightx.json records no sha256 for it (written by an older weightx, or with WEIGHTX_BENCH_NO_HASH=1); cannot verify")
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


