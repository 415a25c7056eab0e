"""The `weightx` command: a thin wrapper over `weightx.api`, which it imports only when a command
runs, so `weightx --help` answers instantly. Every behaviour lives in the API; this prints it."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import click

from weightx.errors import WeightxError
from weightx.io.provenance import prehash_recipe

# torch's OpenMP threads spin while waiting by default, which starves the other threads (our
# block workers, the writer) on a busy or small machine; sleeping costs little for our op sizes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's OpenBLAS pool would wake for nothing we compute (torch does the math) and compete for cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so the same cleanup runs."""


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise Terminated()


class _Group(click.Group):
    """Turns user errors into one line and an exit status; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        import warnings

        shown = warnings.showwarning

        def one_line(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
            if category.__module__.startswith("weightx."):  # ours: one line like errors, no source location
                click.echo(f"warning: {message}", err=True)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = one_line
        # SIGTERM (a job scheduler, `kill`) takes the same path as Ctrl-C: one line, the temporary
        # folder and the lock cleaned up, never an output that looks finished.
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return super().invoke(ctx)
        except WeightxError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            what = "terminated" if isinstance(e, Terminated) else "interrupted"
            click.echo(f"{what}; nothing was written to the output path (rerunning an interrupted apply resumes from its finished shards)", err=True)
            sys.exit(143 if isinstance(e, Terminated) else 130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="weightx", prog_name="weightx", message="%(prog)s %(version)s")
@click.option("--verbose", is_flag=True, help="Keep the libraries' own output (lm-eval's progress bars and logs).")
def main(verbose: bool) -> None:
    """Edit LLM weights through their deltas: ExPO, DARE, TIES, BitDelta, ternary."""
    if verbose:
        os.environ["WEIGHTX_VERBOSE"] = "1"


def _api() -> Any:
    """weightx.api, imported when a command runs: it loads torch, which `weightx --help` must not wait for."""
    import weightx.api

    return weightx.api


def _output(positional: str | None, option: str | None) -> str | None:
    """OUT as mergekit-yaml takes it (`weightx apply CONFIG OUT`) or as --output; both must agree."""
    if positional is not None and option is not None and positional != option:
        raise click.UsageError(f"two output paths: {positional} and --output {option}; give one")
    return positional if positional is not None else option


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("output_path", metavar="[OUT]", required=False, type=click.Path(file_okay=False))
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Output folder (overrides output.path; or give it as OUT).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe value; repeatable.")
@click.option("--dry-run", is_flag=True, help="Resolve inputs and print the plan; compute nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (the old one stays until the new one is complete).")
@click.option("--no-validate", is_flag=True, help="Skip the recipe's validate block.")
@click.option("--no-push", is_flag=True, help="Skip the recipe's push block.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def apply(recipe: str, output_path: str | None, output: str | None, device: str, overrides: tuple[str, ...], dry_run: bool,
          overwrite: bool, no_validate: bool, no_push: bool, progress: bool | None) -> None:
    """Run RECIPE and write its output (to OUT, --output or the recipe's output.path)."""
    import gc

    output = _output(output_path, output)

    # torch's import allocates ~10^6 long-lived objects; collections during it cost ~0.12 s of the
    # start-up. Collection resumes (with those objects frozen) once the imports are done.
    gc.disable()
    try:
        if not dry_run and os.environ.get("WORLD_SIZE", "1") == "1":
            prehash_recipe(recipe)  # input hashes for weightx.json start on the core the imports leave idle
        api = _api()
    finally:
        # Freezing moves the imports' objects out of the collector's sight: every full collection
        # during the stream would walk them all (~0.3 s of CPU on a 1.3 GB merge).
        gc.freeze()
        gc.enable()
    if dry_run:
        click.echo(api.describe_plan(recipe, output=output, overrides=overrides))
        return

    def report(event: str, value: Any) -> None:
        if event == "log":
            click.echo(value, err=True)
        elif event == "sweep":
            click.echo(api.render_sweep(value))
        elif event == "written":
            click.echo(f"wrote {value.path} ({api.human_bytes(value.total_size)} in {len(value.shards)} shard(s), {value.seconds:.1f} s)")
            if value.extra.get("resumed"):
                click.echo(f"resumed {len(value.extra['resumed'])} shard(s) finished by an interrupted run (verified by sha256)", err=True)
        elif event == "validation":
            click.echo(api.render_validation(value))
        elif event == "push":
            click.echo(api.render_push(value))

    api.apply(recipe, output=output, device=device, overrides=overrides, overwrite=overwrite, progress=progress,
              validate=not no_validate, push=not no_push, report=report)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("output_path", metavar="[OUT]", required=False, type=click.Path(file_okay=False))
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Output folder (overrides output.path; or give it as OUT).")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe value; repeatable.")
@click.option("--explain", is_flag=True, help="Also print the recipe as native weightx YAML (e.g. what a mergekit config is read as).")
def plan(recipe: str, output_path: str | None, output: str | None, overrides: tuple[str, ...], explain: bool) -> None:
    """Resolve inputs, check names/shapes/dtypes and print the plan; no compute. RECIPE may be a mergekit config."""
    click.echo(_api().describe_plan(recipe, output=_output(output_path, output), overrides=overrides, explain=explain))


@main.command()
@click.argument("path")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: str, show_tensors: bool, as_json: bool) -> None:
    """Summarise a checkpoint, a weightx output or a delta artifact."""
    click.echo(_api().inspect_source(path, show_tensors=show_tensors, as_json=as_json))


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--tensors", "per_tensor", is_flag=True, help="One row per tensor instead of per layer.")
@click.option("--rank", is_flag=True, help="Also each matrix's effective rank at 90% energy (an SVD per matrix).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write per-layer bar charts to this PNG file.")
@click.option("--direction", type=click.Path(dir_okay=False), help="Text file: report Σ g·δ (ExPO's direction hint) on it.")
def diff(paths: tuple[str, ...], as_json: bool, per_tensor: bool, rank: bool, plot: str | None, direction: str | None) -> None:
    """Statistics of the deltas MODEL − BASE: weightx diff BASE MODEL [MODEL ...]. Writes nothing."""
    click.echo(_api().diff_models(list(paths), rank=rank, as_json=as_json, per_tensor=per_tensor, plot=plot, direction=direction))


@main.command()
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--repo", help="Hub repo id, namespace/name (default: the recipe's push.repo).")
@click.option("--private", is_flag=True, help="Create the repo private (refuses an existing public one).")
@click.option("--revision", help="Branch to push to; created if missing (default: main).")
@click.option("--commit-message", help="Commit summary (default: describes the recipe).")
@click.option("--token", help="Hub token (default: HF_TOKEN or your saved `hf auth login`).")
@click.option("--dry-run", is_flag=True, help="List files, sizes and sha256 and the target; no network call.")
@click.option("--force", is_flag=True, help="Push even though the output failed its validation.")
def push(path: str, repo: str | None, private: bool, revision: str | None, commit_message: str | None,
         token: str | None, dry_run: bool, force: bool) -> None:
    """Publish a finished output folder PATH, with its model card, to the Hugging Face Hub."""
    api = _api()
    result = api.push(path, repo=repo, private=private, revision=revision, commit_message=commit_message,
                      token=token, dry_run=dry_run, force=force, log=lambda m: click.echo(m, err=True))
    click.echo(api.render_dry_run(result) if dry_run else api.render_push(result))


@main.command()
@click.argument("path", type=click.Path(file_okay=False))
def verify(path: str) -> None:
    """Re-hash the shards of a weightx output PATH against the sha256 in its weightx.json."""
    api = _api()
    result = api.verify(path)
    click.echo(api.render_verify(result))
    if not result.passed:
        sys.exit(1)


@main.command("eval")
@click.argument("path")
@click.option("--tasks", "-t", "tasks", multiple=True, required=True,
              help="lm-eval task names, bundled offline tasks (weightx_smoke, weightx_mc, weightx_gen, weightx_ppl) or task YAML/folder paths; repeatable or comma-separated.")
@click.option("--limit", type=float, help="At most this many examples per task (a fraction if < 1).")
@click.option("--batch-size", default="1", show_default=True, help="An integer or auto.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--num-fewshot", type=int, help="Few-shot examples per prompt (default: each task's own).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="Evaluation dtype; auto is float32 on CPU and the stored dtype on GPU.")
@click.option("--compare", "compare", multiple=True, metavar="PATH", help="Evaluate these models too, side by side; repeatable.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results (weightx.json's validation schema) here.")
@click.option("--allow-code-tasks", is_flag=True, help="Run task YAMLs whose !function tags import Python shipped with them.")
def eval_(path: str, tasks: tuple[str, ...], limit: float | None, batch_size: str, device: str, num_fewshot: int | None,
          dtype: str, compare: tuple[str, ...], json_path: str | None, allow_code_tasks: bool) -> None:
    """Evaluate the checkpoint at PATH (a folder or Hub id) with lm-eval; same table as a recipe's validate block."""
    import json

    api = _api()
    names = [t.strip() for item in tasks for t in item.split(",") if t.strip()]
    n = int(limit) if limit is not None and limit >= 1 and limit == int(limit) else limit
    settings = api.EvalSettings(limit=n, batch_size=int(batch_size) if batch_size.isdigit() else batch_size,
                            num_fewshot=num_fewshot, device=None if device == "auto" else device, dtype=dtype)
    v = api.evaluate_paths(path, compare=list(compare), tasks=names, settings=settings, log=lambda m: click.echo(m, err=True),
                           allow_code=allow_code_tasks)
    click.echo(api.render_validation(v))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(v.as_record(), f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
