"""Helpers for the hostile-input tests: each case asserts the exact outcome, never just "no crash"."""

import os
import subprocess
import sys

import pytest


def assert_clean_error(result, *fragments: str, code: int = 1) -> str:
    """A CLI result that failed with exit `code` and one `error: ...` line on stderr naming `fragments`.

    `result` is click's Result (the `run` fixture) or a CompletedProcess (`run_cli`).
    """
    exit_code = getattr(result, "exit_code", getattr(result, "returncode", None))
    stderr = result.stderr
    assert "Traceback" not in stderr and "Traceback" not in (result.stdout or ""), stderr
    assert exit_code == code, f"exit {exit_code}, stderr: {stderr}"
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line, got: {stderr!r}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


@pytest.fixture
def run_cli():
    """`run_cli("build-index", ...)`: the installed CLI in a real process (for signals, locks, stdin)."""

    def invoke(*args, timeout: float = 120, **kwargs):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **kwargs.pop("env", {})}
        return subprocess.run([sys.executable, "-m", "retriever", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=env, **kwargs)

    return invoke
