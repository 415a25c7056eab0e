"""Run state: what a run learns before it writes, passed explicitly from phase to phase.

The recipe and the plan are data that nothing changes after planning; a run's own results live
here instead: the scales BitDelta distillation learned, the selection a global ternary pass made,
and the records of both for weightx.json. The pre-run phases fill one `RunState`; the engine hands
each edit its entry through `TensorContext.run`. A `Recipe` object can therefore be run again, with
other inputs, and plans afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from weightx.combine.base import CombineConfig
from weightx.edits.base import EditConfig


@dataclass
class RunState:
    # id(edit or combine config) → tensor name → what that edit uses for the tensor. Keyed by the config
    # object (not its value): two deltas may carry equal configs with different results.
    per_tensor: dict[int, dict[str, object]] = field(default_factory=dict)
    # weightx.json sections ("distill", "ternary_global") → one record per edit that ran the phase.
    records: dict[str, list[dict]] = field(default_factory=dict)

    def entry(self, edit: EditConfig | CombineConfig, name: str) -> object | None:
        return self.per_tensor.get(id(edit), {}).get(name)

    def learn(self, edit: EditConfig | CombineConfig, values: dict[str, object], section: str, record: dict) -> None:
        """Install one edit's per-tensor results and the record of how they were found."""
        self.per_tensor[id(edit)] = dict(values)
        self.records.setdefault(section, []).append(record)

    def record_sections(self) -> dict[str, dict | list[dict]]:
        """The weightx.json sections: one record as itself, several as a list."""
        return {k: v[0] if len(v) == 1 else v for k, v in self.records.items() if v}
