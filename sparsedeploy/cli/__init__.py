"""The command line: thin click commands that parse flags and call the stage packages."""

from sparsedeploy.cli.main import main

__all__ = ["main"]
