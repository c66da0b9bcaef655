"""The `fusion` command line. Heavy modules (torch) are imported inside commands only."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import click

from .version import __version__
from .api.errors import ConfigErrors, FusionError, os_error

_debug = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fusion")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE_OR_FILE",
              help="Load a plugin from a module name or a .py file (repeatable).")
def cli(debug: bool, plugins: tuple[str, ...]) -> None:
    """Merge and fuse language and vision-language models.

    \b
    fusion demo                      a real merge of tiny models, no network
    fusion merge CONFIG -o OUT       merge the models a YAML config names
    fusion plan CONFIG               show what a merge would do, tensor by tensor
    fusion fuse CONFIG -o OUT        FuseChat-style pairwise knowledge fusion, then a merge
    fusion plugins                   installed plugins, strategies and their parameters
    """
    global _debug
    _debug = _debug or debug
    from . import host as pm

    for spec in plugins:
        pm.add_local_plugin(spec)


def _hub_progress(quiet: bool) -> None:
    """Download bars only where someone watches them, like the merge's own bar."""
    if quiet or not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


_offline = click.option("--offline", is_flag=True, default=False,
                        help="Use only local folders and the download cache (no network).")
_cache_dir = click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                          help="Download cache for Hub models (default: the Hugging Face cache).")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output model folder.")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop; no weights are merged and nothing is written.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--kernel", type=click.Choice(["auto", "c", "torch"]), default="auto", show_default=True,
              help="Merge kernels: compiled C, the torch reference, or the best available.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for the merge arithmetic (default: all CPUs).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 5GB, 500MB).")
@click.option("--random-seed", type=click.IntRange(0, 2**64 - 1), default=None,
              help="Seed of strategies that draw random numbers (overrides the config's random_seed).")
@click.option("--no-card", is_flag=True, help="Do not write a model card (README.md).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@_offline
@_cache_dir
def merge(config, output, dry_run, force, kernel, threads, shard_size, random_seed, no_card, quiet, offline,
          cache_dir):
    """Merge the models named in CONFIG into the folder OUTPUT."""
    from . import pipeline
    from .writer import output_folder, parse_size, refuse_existing

    size = parse_size(shard_size)
    if not dry_run:  # before anything is downloaded
        refuse_existing(output_folder(output), force)
    _hub_progress(quiet)
    # a dry run plans Hub models not in the cache from their remote headers: no weights
    with pipeline.plan(config, offline=offline, cache_dir=cache_dir, weights=not dry_run,
                       random_seed=random_seed) as plan:
        if dry_run:
            pipeline.preflight(plan, kernel)  # refuse what the real run would refuse
            click.echo(plan.render())
            return
        summary = pipeline.write(plan, output, force=force, shard_size=size, kernel=kernel,
                                 threads=threads, progress=not quiet, card=not no_card)
    if not quiet:
        click.echo(summary.text())


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Output folder: targets/, merged/, report.json, and the cache a re-run resumes from.")
@click.option("--until", type=click.Choice(["represent", "fuse", "train", "merge"]), default=None,
              help="Stop after this stage (a later run resumes from it).")
@click.option("--force", is_flag=True, help="Discard cached representations and targets and redo everything.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads per process for scoring and training.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, messages or summary.")
@_offline
@_cache_dir
def fuse(config, output, until, force, threads, quiet, offline, cache_dir):
    """Pairwise knowledge fusion (FuseChat): distil each source into the pivot, then merge.

    Run it with `torchrun --nproc_per_node N -m fusion fuse ...` to train on N processes or GPUs.
    """
    from .fuse.pipeline import run_fuse

    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        run_fuse(config, Path(output), until=until, force=force, offline=offline, cache_dir=cache_dir,
                 echo=(lambda _m: None) if quiet else click.echo, progress=not quiet)
    except KeyboardInterrupt:
        click.echo(f"interrupted; the stages finished so far are kept in {output} and a re-run resumes "
                   f"from them", err=True)
        sys.exit(130)


@cli.command("plan")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_offline
@_cache_dir
def plan_cmd(config, as_json, offline, cache_dir):
    """Show, tensor by tensor, what merging CONFIG would do."""
    from . import pipeline

    _hub_progress(quiet=as_json)
    with pipeline.plan(config, offline=offline, cache_dir=cache_dir, weights=False) as plan:
        click.echo(json.dumps(plan.describe(), indent=2) if as_json else plan.render())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json):
    """List plugins: distribution, version, what each registers, and load errors."""
    from . import host as pm

    infos = pm.plugin_infos()
    strategies = pm.strategies()
    registered = pm.host().registered("strategy")
    if as_json:
        data = [dict(i.as_dict(), strategies=[strategies[s].describe() for s in i.strategies if s in strategies])
                for i in infos]
        click.echo(json.dumps(data, indent=2))
        return
    for info in infos:
        dist = f"{info.distribution} {info.version}" if info.distribution else info.origin
        click.echo(f"{info.name}  ({dist}, {info.origin})")
        if info.error:
            click.echo(f"  ERROR: {info.error}")
        for name in info.shadowed:
            click.echo(f"  replaced by a later plugin: {name}")
        if "resolve_model" in info.hooks:
            click.echo("  resolves model references")
        for name in info.strategies:
            if registered[name][-1][0] != info.name:  # replaced by a later plugin (said above)
                continue
            s = strategies[name]
            paper = f"  {s.paper}" if s.paper else ""
            click.echo(f"  strategy {s.name}: {s.description}{paper}")
            base = {"required": "needs base_model", "optional": "base_model optional",
                    "unused": "no base_model"}.get(s.base, s.base)
            click.echo(f"    merges {s.models_text()} model(s); {base}" + ("; seeded" if s.random else ""))
            for p in s.parameters:
                rng = f" in {p.range_text}" if p.range_text else ""
                scope = "per model" if p.per_model else "global"
                default = "required" if p.required else f"default {p.default!r}"
                click.echo(f"    {p.name} ({p.type.__name__}, {scope}, {default}{rng})"
                           + (f": {p.help}" if p.help else ""))
        if info.architectures:
            click.echo(f"  architectures: {', '.join(info.architectures)}")
        for kind, names, known in (("alignment", info.alignments, pm.alignments()),
                                   ("fusion function", info.fusion_functions, pm.fusion_functions())):
            for name in names:
                if name in known:
                    click.echo(f"  {kind} {name}: {known[name].description}")
    from .api.kernels import status

    click.echo(status())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def architectures(as_json):
    """List the architectures fusion recognises."""
    from . import host as pm

    specs = pm.architectures()
    if as_json:
        click.echo(json.dumps([s.describe() for s in specs], indent=2))
        return
    for s in specs:
        names = ", ".join(s.architectures + tuple(f"model_type={m}" for m in s.model_types))
        click.echo(f"{s.name:<12} {s.description}  ({names})")


@cli.command()
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Keep the demo's models and merged output in this folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def demo(output, quiet):
    """Build a tiny Qwen2 base and two fine-tunes, merge them, and check the result."""
    from .demo import run_demo

    run_demo(Path(output) if output else None, progress=not quiet, echo=click.echo)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, a container stopping): unwound like Ctrl-C, so the
    temporary output is removed on the way out."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _interrupted(exc: BaseException) -> None:
    terminated = isinstance(exc, Terminated)
    click.echo(f"{'terminated' if terminated else 'interrupted'}; no output was written", err=True)
    sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))


def main(argv: list[str] | None = None) -> None:
    global _debug
    argv = list(sys.argv[1:] if argv is None else argv)
    _debug = "--debug" in argv or os.environ.get("FUSION_DEBUG") == "1"
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main else None
    try:
        _run(argv)
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str]) -> None:
    try:
        cli.main(args=argv, prog_name="fusion", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # bad input, like every other input error: one line, exit 1
        ctx = getattr(exc, "ctx", None)
        see = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        click.echo(f"error: {exc.format_message().rstrip('.')}{see}", err=True)
        sys.exit(1)
    except click.Abort as exc:
        # without standalone mode click turns Ctrl-C into Abort
        if isinstance(exc.__context__, KeyboardInterrupt):
            _interrupted(exc.__context__)
        click.echo("aborted", err=True)
        sys.exit(1)
    except FusionError as exc:
        if _debug:
            raise
        for problem in exc.errors if isinstance(exc, ConfigErrors) else [exc]:
            click.echo(f"error: {problem}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except Exception as exc:  # a bug: say so, keep the traceback behind --debug
        if _debug:
            raise
        known = os_error(exc, "cannot go on")  # the machine, not fusion: disk full, permissions
        if known is not None:
            click.echo(f"error: {known}", err=True)
            sys.exit(1)
        click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        sys.exit(2)
