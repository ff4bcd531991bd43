"""The `sparsedeploy` command line: parsing and printing only; the work lives in the library."""

from __future__ import annotations

import logging
import os
import sys

import click

from sparsedeploy.common.errors import UserError
from sparsedeploy.cli.bench import bench, engines
from sparsedeploy.cli.evaluate import eval_cmd
from sparsedeploy.cli.export import export_cmd, generate_cmd, inspect_cmd
from sparsedeploy.cli.prune import prune, recover
from sparsedeploy.cli.run import run

log = logging.getLogger("sparsedeploy")


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SPARSEDEPLOY_DEBUG") == "1"
    try:
        cli.main(args=argv, prog_name="sparsedeploy", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:  # click turns Ctrl-C into Abort
        click.echo("interrupted: no output was written", err=True)
        sys.exit(130)
    except UserError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted: no output was written", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line unless --debug
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
