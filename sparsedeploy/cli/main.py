"""The `sparsedeploy` command line: parsing and printing only; the work lives in the library."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from sparsedeploy.cli.bench import bench, engines
from sparsedeploy.cli.evaluate import eval_cmd
from sparsedeploy.cli.export import export_cmd, generate_cmd, inspect_cmd
from sparsedeploy.cli.prune import prune, recover
from sparsedeploy.cli.run import run
from sparsedeploy.common.errors import UserError

log = logging.getLogger("sparsedeploy")


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show tracebacks")
@click.option("-q", "--quiet", is_flag=True, help="only warnings and results")
@click.version_option(package_name="sparsedeploy")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Prune a causal LLM without retraining, check its quality, export and benchmark it."""
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet
    setup_logging(quiet)


for command in (prune, eval_cmd, run, export_cmd, inspect_cmd, generate_cmd, recover, bench, engines):
    cli.add_command(command)


_OOM_REMEDY = {
    "prune": "use --offload cpu or --offload disk, or fewer --nsamples / a shorter --seqlen",
    "run": "set offload: cpu or disk in the recipe (or --offload), or fewer calibration.nsamples / a shorter seqlen",
    "eval": "use a shorter --seqlen or --device cpu",
    "recover": "use a smaller --batch, a shorter --seqlen or a lower --rank",
    "export": "export on a machine with more memory, or with --dtype float16",
    "bench": "use smaller --batch sizes or a shorter --prompt-len",
}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally`/cleanup runs as for Ctrl-C (a BaseException,
    like KeyboardInterrupt, so that no `except Exception` turns it into another error)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _interrupted(what: str, code: int) -> None:
    from sparsedeploy.common.files import KEPT_FOR_RESUME

    kept = "; ".join(f"{done} kept in {where}" for where, done in KEPT_FOR_RESUME.items() if Path(where).exists())
    if kept:
        click.echo(
            f"{what}: no final output was written; {kept}: rerun the same command with --resume to continue", err=True
        )
    else:
        click.echo(f"{what}: no output was written", err=True)
    sys.exit(code)


def _command(argv: list[str]) -> str:
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: list[str] | None = None) -> None:
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SPARSEDEPLOY_DEBUG") == "1"
    from sparsedeploy.common.files import KEPT_FOR_RESUME, RUN_STAGE

    KEPT_FOR_RESUME.clear()
    RUN_STAGE.clear()
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (embedded use): leave the handler alone
        previous = None
    try:
        _main(argv, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str], debug: bool) -> None:
    try:
        cli.main(args=argv, prog_name="sparsedeploy", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:  # click turns Ctrl-C into Abort
        _interrupted("interrupted", 130)
    except Terminated:
        _interrupted("terminated (SIGTERM)", 143)
    except UserError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted("interrupted", 130)
    except (MemoryError, RuntimeError) as exc:
        text = str(exc).lower()
        oom = (
            isinstance(exc, MemoryError)
            or type(exc).__name__ == "OutOfMemoryError"
            or "out of memory" in text
            or "can't allocate memory" in text
            or "cannot allocate memory" in text
            or "bad_alloc" in text
        )
        if debug or not oom:
            if debug:
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(f"error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)
        from sparsedeploy.common.files import RUN_STAGE

        command = _command(argv)
        stage = RUN_STAGE.get("name") or command
        where = "GPU" if type(exc).__name__ == "OutOfMemoryError" or "CUDA" in str(exc) else "memory"
        remedy = _OOM_REMEDY.get(command, "free memory or use a smaller model")
        click.echo(f"error: out of {where} in stage {stage}: {remedy}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line unless --debug
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
