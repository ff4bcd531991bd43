"""Thin shim so `python cli.py ...` works from a checkout; the CLI lives in sparsedeploy/cli.py."""

from sparsedeploy.cli import main

if __name__ == "__main__":
    main()
