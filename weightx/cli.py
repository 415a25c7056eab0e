"""The `weightx` command. Imports stay inside commands so `weightx --help` answers instantly."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

# torch's OpenMP threads spin while waiting by default, which starves the other threads (our
# block workers, the writer) on a busy or small machine; sleeping costs little for our op sizes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's OpenBLAS pool would wake for nothing we compute (torch does the math) and compete for cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


class _Group(click.Group):
    """Turns user errors into one line and an exit status; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        import warnings

        from weightx.errors import WeightxError

        shown = warnings.showwarning

        def one_line(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
            if category.__module__.startswith("weightx."):  # ours: one line like errors, no source location
                click.echo(f"warning: {message}", err=True)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = one_line
        try:
            return super().invoke(ctx)
        except WeightxError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written to the output path (rerunning an interrupted apply resumes from its finished shards)", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="weightx", prog_name="weightx", message="%(prog)s %(version)s")
def main() -> None:
    """Edit LLM weights through their deltas: ExPO, DARE, TIES, BitDelta, ternary."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Output folder (overrides output.path).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe value; repeatable.")
@click.option("--dry-run", is_flag=True, help="Resolve inputs and print the plan; compute nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (the old one stays until the new one is complete).")
@click.option("--no-validate", is_flag=True, help="Skip the recipe's validate block.")
@click.option("--no-push", is_flag=True, help="Skip the recipe's push block.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def apply(recipe: str, output: str | None, device: str, overrides: tuple[str, ...], dry_run: bool,
          overwrite: bool, no_validate: bool, no_push: bool, progress: bool | None) -> None:
    """Run RECIPE and write its output."""
    import gc
    from pathlib import Path

    # torch's import allocates ~10^6 long-lived objects; collections during it cost ~0.12 s of the
    # start-up. Collection resumes (with those objects frozen) once the plan is built.
    gc.disable()
    try:
        if not dry_run and os.environ.get("WORLD_SIZE", "1") == "1":
            from weightx.provenance import prehash_recipe

            prehash_recipe(recipe)  # input hashes for weightx.json start on the core the imports leave idle

        from weightx.api import execute
        from weightx.plan import build_plan, human_bytes, render_plan
        from weightx.recipe import load_recipe

        r = load_recipe(recipe, overrides)
        plan = build_plan(r, output, Path(recipe).parent)
    finally:
        gc.freeze()
        gc.enable()
    if dry_run:
        click.echo(render_plan(plan) + (f"\n{r.sweep.describe()}" if r.sweep is not None else ""))
        return
    sweep = tasks = None
    if r.sweep is not None:  # evaluate every candidate in memory; only the winner is written
        from weightx.validate.report import run_recipe_sweep
        from weightx.validate.table import render_sweep

        r, sweep, tasks = run_recipe_sweep(r, output=output, recipe_dir=Path(recipe).parent, device=device,
                                           validate=not no_validate, log=lambda m: click.echo(m, err=True))
        click.echo(render_sweep(sweep))
        plan = build_plan(r, output, Path(recipe).parent)
    if tasks is None and r.validate_ is not None and not no_validate and os.environ.get("RANK", "0") == "0":
        from weightx.validate.tasks import load_tasks, resolve_tasks

        # An unknown task or one whose data is offline stops the run before any compute.
        tasks = load_tasks(resolve_tasks(r.validate_.tasks, Path(recipe).parent))
    # The imports left ~10^6 long-lived objects; every full collection during the stream would walk
    # them all (~0.3 s of CPU on a 1.3 GB merge). Freezing moves them out of the collector's sight.
    gc.freeze()
    result = execute(plan, device=device, overwrite=overwrite, progress=progress)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 alone reports, validates and publishes
    click.echo(f"wrote {result.path} ({human_bytes(result.total_size)} in {len(result.shards)} shard(s), {result.seconds:.1f} s)")
    if result.extra.get("resumed"):
        click.echo(f"resumed {len(result.extra['resumed'])} shard(s) finished by an interrupted run (verified by sha256)", err=True)
    if r.validate_ is not None and not no_validate:
        from weightx.validate.report import GateFailed, validate_output
        from weightx.validate.table import render_validation

        v = validate_output(plan, path=result.path, recipe_dir=Path(recipe).parent, device=device, sweep=sweep,
                            tasks=tasks, log=lambda m: click.echo(m, err=True))
        click.echo(render_validation(v))
        if not v.passed:
            raise GateFailed(v, result.path)
    if r.push is not None and not no_push:  # keep last: publish only after apply (and validation) succeeded
        from weightx.publish import push_spec, render_push

        click.echo(render_push(push_spec(result.path, r.push, log=lambda m: click.echo(m, err=True))))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Output folder (overrides output.path).")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe value; repeatable.")
def plan(recipe: str, output: str | None, overrides: tuple[str, ...]) -> None:
    """Resolve inputs, check names/shapes/dtypes and print the plan; no compute."""
    from pathlib import Path

    from weightx.plan import build_plan, render_plan
    from weightx.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    click.echo(render_plan(build_plan(r, output, Path(recipe).parent)) + (f"\n{r.sweep.describe()}" if r.sweep is not None else ""))


@main.command()
@click.argument("path")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: str, show_tensors: bool, as_json: bool) -> None:
    """Summarise a checkpoint, a weightx output or a delta artifact."""
    from weightx.inspect import inspect_source

    click.echo(inspect_source(path, show_tensors=show_tensors, as_json=as_json))


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
    from weightx.publish import push as push_folder
    from weightx.publish import render_dry_run, render_push

    result = push_folder(path, repo=repo, private=private, revision=revision, commit_message=commit_message,
                         token=token, dry_run=dry_run, force=force, log=lambda m: click.echo(m, err=True))
    click.echo(render_dry_run(result) if dry_run else render_push(result))


@main.command()
@click.argument("path", type=click.Path(file_okay=False))
def verify(path: str) -> None:
    """Re-hash the shards of a weightx output PATH against the sha256 in its weightx.json."""
    from weightx.verify import render_verify
    from weightx.verify import verify as verify_output

    result = verify_output(path)
    click.echo(render_verify(result))
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
def eval_(path: str, tasks: tuple[str, ...], limit: float | None, batch_size: str, device: str, num_fewshot: int | None,
          dtype: str, compare: tuple[str, ...], json_path: str | None) -> None:
    """Evaluate the checkpoint at PATH (a folder or Hub id) with lm-eval; same table as a recipe's validate block."""
    import json

    from weightx.validate.report import evaluate_paths
    from weightx.validate.runner import EvalSettings
    from weightx.validate.table import render_validation

    names = [t.strip() for item in tasks for t in item.split(",") if t.strip()]
    n = int(limit) if limit is not None and limit >= 1 and limit == int(limit) else limit
    settings = EvalSettings(limit=n, batch_size=int(batch_size) if batch_size.isdigit() else batch_size,
                            num_fewshot=num_fewshot, device=None if device == "auto" else device, dtype=dtype)
    v = evaluate_paths(path, compare=list(compare), tasks=names, settings=settings, log=lambda m: click.echo(m, err=True))
    click.echo(render_validation(v))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(v.as_record(), f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
