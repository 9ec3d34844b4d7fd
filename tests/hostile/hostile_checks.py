"""Assertions shared by the hostile-input tests: each case asserts the exact outcome, never just "no crash".

A plain module (not conftest.py) so that test files can import it by name: pytest puts this
folder on sys.path, as tests/ has no packages.
"""


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
