"""The explicit DeepSparse install step: `pytest -m deepsparse_install tests/runtimes/test_deepsparse_install.py`."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

import pytest


def _index_reachable() -> str | None:
    """None when the package index answers, else why not."""
    import os

    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    host = urlparse(url).hostname
    if not host:
        return f"pip index {url} is not a network index"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        return f"package index {host} unreachable ({exc}): DeepSparse cannot be installed offline"
    return None


@pytest.mark.deepsparse_install
def test_install_deepsparse_into_its_own_venv():
    from sparsedeploy.runtimes import deepsparse_env as ds

    problem = ds.platform_problem() or _index_reachable()
    if problem:
        pytest.skip(problem)
    env = ds.find_env() or ds.install()
    assert env.is_complete() and env.python.exists()
