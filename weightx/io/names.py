"""Name prefixes: map a checkpoint whose tensor names differ from the config model's by a consistent prefix.

A fine-tune saved through PEFT (`base_model.model.…`), without the `model.` prefix, GPT-2 without
`transformer.`, or a vision-language model in transformers' newer layout (`model.language_model.…` for
`language_model.model.…`) holds the same tensors under other names. `prefix_rules` finds the few prefix
replacements (A → B) that map every name the config model has and the input lacks onto names the input
has and the config model lacks, one to one; `renamed` gives the input under the config model's names.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from weightx.io.safetensors import Header
from weightx.io.sources import Source

MAX_RULES = 4


def _tail(name: str, parts: int = 2) -> str:
    return ".".join(name.split(".")[-parts:])


def _rule(want: str, have: str) -> tuple[str, str] | None:
    """(A, B) with want = A + s and have = B + s for the longest common dotted suffix s, or None."""
    a, b = want.split("."), have.split(".")
    k = 0
    while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
        k += 1
    if k == 0:
        return None
    pa, pb = ".".join(a[:len(a) - k]), ".".join(b[:len(b) - k])
    return (pa + "." if pa else "", pb + "." if pb else "")


def prefix_rules(wanted: set[str], names: set[str]) -> tuple[list[tuple[str, str]], dict[str, str]] | None:
    """(rules, {wanted name: input name}) mapping every wanted name the input lacks, or None."""
    missing = sorted(wanted - names)
    spare = names - wanted
    if not missing or not spare:
        return None
    by_tail: dict[str, list[str]] = {}
    for n in spare:
        by_tail.setdefault(_tail(n), []).append(n)
    votes: Counter = Counter()
    for m in missing:
        for n in by_tail.get(_tail(m), []):
            r = _rule(m, n)
            if r is not None and r[0] != r[1]:
                votes[r] += 1
    rules: list[tuple[str, str]] = []
    mapping: dict[str, str] = {}
    left = list(missing)
    for rule, _ in votes.most_common():
        if not left or len(rules) == MAX_RULES:
            break
        a, b = rule
        hits = {m: b + m[len(a):] for m in left if m.startswith(a) and b + m[len(a):] in spare}
        if hits:
            rules.append(rule)
            mapping.update(hits)
            left = [m for m in left if m not in hits]
    if left or len(set(mapping.values())) != len(mapping):
        return None
    return rules, mapping


def renamed(src: Source, mapping: dict[str, str], rules: list[tuple[str, str]]) -> Source:
    """`src` listing its tensors under the wanted names (`mapping`: wanted → its own)."""
    back = {v: k for k, v in mapping.items()}
    headers = {}
    for shard, h in src.headers.items():
        tensors = {back.get(n, n): dataclasses.replace(i, name=back.get(n, n)) for n, i in h.tensors.items()}
        headers[shard] = Header(h.path, h.data_start, tensors, h.metadata)
    weight_map = {back.get(n, n): s for n, s in src.weight_map.items()}
    return dataclasses.replace(src, headers=headers, weight_map=weight_map, renames=tuple(rules))


def matched_names(src: Source, wanted: set[str]) -> tuple[Source, int] | None:
    """`src` read under the `wanted` names, and how many tensors were renamed; None when no consistent
    prefix rules map its names (or none need mapping)."""
    found = prefix_rules(wanted, set(src.weight_map))
    if found is None:
        return None
    rules, mapping = found
    return renamed(src, mapping, rules), len(mapping)


def describe_rules(rules: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"'{b or '(none)'}' for '{a or '(none)'}'" for a, b in rules)


__all__ = ["describe_rules", "matched_names", "prefix_rules", "renamed"]
