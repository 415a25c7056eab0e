"""Which lm-eval tasks to run: weightx's bundled offline tasks, local task YAMLs/folders, or built-ins.

lm-eval's built-in tasks fetch their data from the Hub, so weightx ships three small tasks whose
data lives in this package: `weightx_mc` (multiple choice, loglikelihood), `weightx_gen`
(greedy generation scored by exact match after a regex filter) and `weightx_ppl` (rolling
loglikelihood over a bundled text). `weightx_smoke` is the group of all three. Their configs are
built here at run time with absolute data paths, so they work from any directory and from an
installed wheel.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightx.errors import InputError, UsageError
from weightx.io.files import is_regular, read_regular

DATA = Path(__file__).resolve().parent / "data"
SMOKE = "weightx_smoke"


def _json_data(file: str) -> dict[str, Any]:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(DATA / file)}}, "test_split": "test"}


def _mean(metric: str, higher: bool = True) -> dict[str, Any]:
    return {"metric": metric, "aggregation": "mean", "higher_is_better": higher}


def bundled_configs() -> dict[str, dict[str, Any]]:
    """Fresh lm-eval task configs (dicts) for the bundled tasks, keyed by task name."""
    mc = {
        "task": "weightx_mc",
        **_json_data("mc.jsonl"),
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [_mean("acc"), _mean("acc_norm")],
        "metadata": {"version": 1.0},
    }
    gen = {
        "task": "weightx_gen",
        **_json_data("gen.jsonl"),
        "output_type": "generate_until",
        # Two worked examples teach the one-word answer format even to a 135M model.
        "description": "Answer with one word or number.\n\nQuestion: What is the capital of Norway?\nAnswer: Oslo\n\n"
                       "Question: What is 4 + 5?\nAnswer: 9\n\n",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n", "Question:"], "do_sample": False, "max_gen_toks": 8},
        "filter_list": [{"name": "first_word", "filter": [
            {"function": "regex", "regex_pattern": r"([A-Za-z0-9]+)", "group_select": 0},
            {"function": "take_first"},
        ]}],
        "metric_list": [{**_mean("exact_match"), "ignore_case": True, "ignore_punctuation": True}],
        "metadata": {"version": 1.0},
    }
    ppl = {
        "task": "weightx_ppl",
        "dataset_path": "text",
        "dataset_kwargs": {"data_files": {"test": str(DATA / "ppl.txt")}, "sample_by": "paragraph"},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
        "metadata": {"version": 1.0},
    }
    return {"weightx_mc": mc, "weightx_gen": gen, "weightx_ppl": ppl}


def smoke_group(children: list[Any]) -> Any:
    """`weightx_smoke`: the three bundled tasks as one lm-eval group.

    The group's `acc` is the multiple-choice accuracy (its only child with acc), so a gate like
    `weightx_smoke/acc` reads naturally. Built as an object: lm-eval would rename inline children
    of a dict-defined group to `weightx_smoke::weightx_mc`.
    """
    from lm_eval.api.group import Group
    from lm_eval.config.group import AggMetricConfig

    group = Group(SMOKE, aggregate_metric_list=[AggMetricConfig("acc", weight_by_size=False)], metadata={"version": 1.0})
    for child in children:
        group.add(child)
    return group


BUNDLED = ("weightx_mc", "weightx_gen", "weightx_ppl", SMOKE)


@dataclass
class TaskSet:
    """Resolved task specs, ready for `TaskManager.load`, plus what each one is called."""

    specs: list[Any]  # str names, YAML paths or config dicts
    labels: list[str]  # what the user wrote, for messages
    kinds: list[str] = field(default_factory=list)  # "bundled" | "local" | "builtin", per spec
    include_paths: list[str] = field(default_factory=list)
    needs_builtins: bool = False


def _folder_tasks(folder: Path) -> list[str]:
    """Names of the tasks (or, if there are any, groups) defined by the YAMLs in a folder."""
    from lm_eval.tasks._index import Kind, TaskIndex

    index = TaskIndex().build([folder])
    groups = [k for k, e in index.items() if e.kind == Kind.GROUP]
    names = groups or [k for k, e in index.items() if e.kind in (Kind.TASK, Kind.PY_TASK)]
    if not names:
        raise UsageError(f"task folder {folder} defines no lm-eval task (no YAML with a `task:` key)")
    return sorted(names)


MAX_SCANNED = 2000  # task YAMLs looked at for code tags in one include folder


def code_tags(folder: Path) -> list[Path]:
    """Task YAMLs under `folder` (which lm-eval indexes whole) that import Python when loaded:
    `!function` tags name a function in a .py file next to them."""
    found = []
    for n, path in enumerate(sorted(folder.rglob("*.y*ml"))):
        if n >= MAX_SCANNED:
            break
        if path.suffix in (".yaml", ".yml") and is_regular(path) and b"!function" in read_regular(path, 1 << 20):
            found.append(path)
    return found


def resolve_tasks(tasks: list[str], base_dir: Path | None = None, allow_code: bool = False) -> TaskSet:
    """Turn the recipe's `tasks` into lm-eval specs: bundled names, local YAML/folder paths, built-ins.

    Local task folders can carry `!function` tags, which make lm-eval import a `utils.py` shipped
    next to them: code from a file. They are refused unless `allow_code` (the recipe's
    `validate.allow_code_tasks`, `weightx eval --allow-code-tasks`) says to run it."""
    bundled = bundled_configs()
    out = TaskSet([], [])

    def add(spec: Any, label: str, kind: str) -> None:
        out.specs.append(spec)
        out.labels.append(label)
        out.kinds.append(kind)

    for name in tasks:
        if name in bundled or name == SMOKE:
            add(name if name == SMOKE else bundled[name], name, "bundled")
            continue
        path = Path(os.path.expanduser(name))
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path  # a recipe's task paths are relative to its folder, `weightx eval`'s to the cwd
        if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name:
            if path.is_file():
                add(str(path.resolve()), name, "local")
                out.include_paths.append(str(path.resolve().parent))
            elif path.is_dir():
                out.include_paths.append(str(path.resolve()))
                for t in _folder_tasks(path.resolve()):
                    add(t, t, "local")
            else:
                raise UsageError(f"task {name!r}: no such task file or folder; give an lm-eval task name, a bundled task ({', '.join(BUNDLED)}) or a path to a task YAML/folder")
            continue
        add(name, name, "builtin")
        out.needs_builtins = True
    if not allow_code:
        for folder in dict.fromkeys(out.include_paths):
            tagged = code_tags(Path(folder))
            if tagged:
                raise UsageError(f"task file {tagged[0]} has a !function tag, which runs Python shipped next to it;"
                                 " read that code, then opt in with validate.allow_code_tasks: true (or"
                                 " weightx eval --allow-code-tasks), or use a task without code")
    return out


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@dataclass
class LoadedTasks:
    """Built lm-eval tasks, reused for every model of a run (output, compare inputs, sweep candidates)."""

    manager: Any  # the TaskManager; simple_evaluate would otherwise index every built-in YAML again
    items: list[Any]  # top-level Task / Group objects, in the order asked for
    tasks: dict[str, Any]  # every leaf task by name
    groups: dict[str, Any]


def load_tasks(taskset: TaskSet) -> LoadedTasks:
    """Build every lm-eval task once (data included), failing fast with one line on the first problem."""
    from lm_eval.tasks import TaskManager

    quiet_lm_eval()
    # Indexing lm-eval's ~15k built-in YAMLs takes seconds; skip it when nothing needs them.
    tm = TaskManager(include_path=taskset.include_paths or None, include_defaults=taskset.needs_builtins)
    out = LoadedTasks(tm, [], {}, {})
    for spec, label, kind in zip(taskset.specs, taskset.labels, taskset.kinds):
        if kind == "builtin" and not offline() and (why := hub_unreachable()):
            # datasets would retry for ~30 s before failing; one look at the network says it now
            raise InputError(f"task {label!r} needs data from the Hugging Face Hub, which is unreachable here ({why});"
                             f" use a bundled local task ({', '.join(BUNDLED)}) or a local task YAML, set HF_HUB_OFFLINE=1"
                             " to use data already in your cache, or go online")
        try:
            if spec == SMOKE:
                parts = tm.load([bundled_configs()[n] for n in BUNDLED[:3]])
                one = tm.load([smoke_group(list(parts["tasks"].values()))])
            else:
                one = tm.load([spec])
        except KeyError:
            close = difflib.get_close_matches(label, list(BUNDLED) + tm.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"unknown lm-eval task {label!r}{hint} (bundled offline tasks: {', '.join(BUNDLED)})") from None
        except Exception as e:  # noqa: BLE001 - lm-eval/datasets raise many types for missing data
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            if kind == "builtin" and (offline() or _looks_like_network(e)):
                raise InputError(
                    f"task {label!r} needs data from the Hugging Face Hub, which is unreachable here"
                    f" ({'HF_HUB_OFFLINE=1' if offline() else reason}); use a bundled local task"
                    f" ({', '.join(BUNDLED)}) or a local task YAML, or go online"
                ) from None
            raise InputError(f"task {label!r} could not be loaded: {reason}") from None
        for name in one["tasks"]:
            if name in out.tasks:
                raise UsageError(f"task {name!r} is asked for twice in validate.tasks (directly and through a group?)")
        out.tasks.update(one["tasks"])
        out.groups.update(one.get("groups") or {})
        # Top level: groups that are nobody's child, then tasks in no group.
        children = {c for g in (one.get("groups") or {}).values() for c in g.child_names}
        tops = [g for n, g in (one.get("groups") or {}).items() if n not in children]
        in_groups = {t.task_name for g in tops for t in g.get_all_tasks()}
        out.items += tops + [t for n, t in one["tasks"].items() if n not in in_groups]
    return out


_REACHABLE: dict[str, str | None] = {}


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub (HF_ENDPOINT) cannot be reached, found once per process; None when it answers."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if endpoint not in _REACHABLE:
        url = urllib.parse.urlsplit(endpoint)
        host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[endpoint] = None
        except OSError as e:
            _REACHABLE[endpoint] = f"{host}:{port} did not answer: {e.strerror or type(e).__name__}"
    return _REACHABLE[endpoint]


def _looks_like_network(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, ConnectionError) or any(w in text for w in ("offline", "connection", "couldn't reach", "resolve host", "timed out"))


def quiet_lm_eval() -> None:
    """lm-eval and datasets log every step at INFO/WARNING; weightx prints its own table instead."""
    for name in ("lm_eval", "lm-eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - a dependency of lm-eval
        pass
