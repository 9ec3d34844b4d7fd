"""Helpers for the hostile-input tests: each case asserts the exact outcome, never just "no crash"."""

import os
import subprocess
import sys

import pytest
from hostile_checks import assert_clean_error  # noqa: F401 (re-exported for older imports)


@pytest.fixture
def run_cli():
    """`run_cli("build-index", ...)`: the installed CLI in a real process (for signals, locks, stdin)."""

    def invoke(*args, timeout: float = 120, **kwargs):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **kwargs.pop("env", {})}
        return subprocess.run(
            [sys.executable, "-m", "retriever", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            **kwargs,
        )

    return invoke
