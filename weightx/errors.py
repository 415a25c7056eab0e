"""User-facing errors. Anything else that escapes the CLI is a bug and keeps its traceback."""

from __future__ import annotations


class WeightxError(Exception):
    """A problem the user can fix: printed as one message, exit status `exit_code`."""

    exit_code = 1


class UsageError(WeightxError):
    """Bad recipe or arguments."""

    exit_code = 2


class RecipeError(UsageError):
    """Every problem found in a recipe, reported together."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source} has {len(problems)} problem{'s' if len(problems) != 1 else ''}:"]
        lines += [f"  - {loc}: {msg}" if loc else f"  - {msg}" for loc, msg in problems]
        super().__init__("\n".join(lines))


class InputError(WeightxError):
    """A model source that is missing, unreadable or malformed."""


class PlanError(WeightxError):
    """Inputs that cannot be combined as the recipe asks (missing tensors, shape mismatches...)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        head = f"the recipe cannot run; {len(problems)} problem{'s' if len(problems) != 1 else ''}:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))
