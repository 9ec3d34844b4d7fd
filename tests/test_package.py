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
    for command in ("build-index", "query", "caption", "info", "models", "serve", "finetune", "interrogate", "eval"):
        assert command in result.stdout


def test_missing_faiss_names_the_extra_to_install(tmp_path):
    """faiss comes from the cpu or gpu extra; without it the CLI says which to install, in one line."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\n")
    code = ("import sys; sys.modules['faiss'] = None; sys.argv = ['retriever', 'build-index', sys.argv[1], "
            "'--model', 'toyworld', '--out', sys.argv[2], '--quiet']\nfrom retriever.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / "idx")],
                            capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert result.stderr.startswith("error: FAISS is not installed") and "retriever[cpu]" in result.stderr
    assert "Traceback" not in result.stderr
