import subprocess
import sys


def test_import_is_light():
    code = "import sys, retriever; heavy = {'torch', 'open_clip', 'faiss', 'pandas', 'typer'} & set(sys.modules); print(sorted(heavy))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_public_api_resolves_lazily():
    import retriever

    assert retriever.Retriever.__name__ == "Retriever"
    assert callable(retriever.build_index)
    assert issubclass(retriever.ModelError, retriever.RetrieverError)


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "retriever", "-h"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("build-index", "query", "info", "models"):
        assert command in result.stdout
