"""Every user-facing error of weightx, in one place.

Each subclasses `WeightxError` (printed by the CLI as one line, exit status `exit_code`) and the
standard exception a library user would catch for it (`ValueError`, `FileNotFoundError`,
`PermissionError`, ...). Anything else that escapes the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations


class WeightxError(Exception):
    """A problem the user can fix: printed as one message, exit status `exit_code`."""

    exit_code = 1


class _Problems:
    """An error that may carry several problems; its type never depends on how many."""

    def __init__(self, problems: str | list[str], head: str = "", prefix: str = "") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:  # one problem, one line
            text = prefix + self.problems[0]
        else:
            n = len(self.problems)
            head = head or f"{n} problem{'s' if n != 1 else ''}:"
            text = "\n".join([head] + [f"  - {p}" for p in self.problems])
        super().__init__(text)  # type: ignore[call-arg]


class UsageError(WeightxError, ValueError):
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


class InputError(_Problems, WeightxError, ValueError):
    """A model source that is unreadable or malformed (one or several)."""

    def __init__(self, problems: str | list[str]):
        n = 1 if isinstance(problems, str) else len(problems)
        super().__init__(problems, f"{n} inputs cannot be read:")


class InputNotFoundError(InputError, FileNotFoundError):
    """A model source that does not exist (locally or on the Hub)."""


class PlanError(_Problems, WeightxError, ValueError):
    """Inputs that cannot be combined as the recipe asks (missing tensors, shape mismatches...)."""

    def __init__(self, problems: str | list[str]):
        n = 1 if isinstance(problems, str) else len(problems)
        super().__init__(problems, f"the recipe cannot run; {n} problems:", prefix="the recipe cannot run: ")


class OutputError(WeightxError, OSError):
    """The output path cannot be used or written (exists, not ours, not writable, disk full)."""

    def __str__(self) -> str:  # OSError's own formatting would add errno fields we never set
        return str(self.args[0]) if self.args else ""


class OutputBusyError(OutputError, BlockingIOError):
    """Another weightx process holds the output's lock."""


class VerifyFailed(WeightxError, ValueError):
    """An output's files do not match the sha256 its weightx.json records."""


class PushError(WeightxError, ConnectionError):
    """Publishing to the Hub failed (auth, network, refused repo, unfinished output)."""


class GateFailed(WeightxError, AssertionError):
    """A validate.require gate failed; the output is kept and the results recorded."""


class RankFailed(WeightxError, RuntimeError):
    """Another rank of a distributed run failed."""
