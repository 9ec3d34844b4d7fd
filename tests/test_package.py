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
    code = (
        "import sys; sys.modules['faiss'] = None; sys.argv = ['retriever', 'build-index', sys.argv[1], "
        "'--model', 'toyworld', '--out', sys.argv[2], '--quiet']\nfrom retriever.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(corpus), str(tmp_path / "idx")],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: FAISS is not installed") and "caption-retriever[cpu]" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_names_the_index_format_and_libraries_without_importing_them():
    """`retriever --version` reads versions from package metadata: torch, open_clip and faiss stay unimported."""
    from retriever.index.store import READABLE_FORMATS

    code = (
        "import sys; sys.argv = ['retriever', '--version']\nfrom retriever.cli import main\ntry:\n    main()\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "print(sorted({'torch', 'open_clip', 'faiss'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == f"retriever {retriever_version()} (caption-retriever)"
    assert lines[1] == f"index formats {', '.join(map(str, READABLE_FORMATS))}"
    names = {line.split()[0] for line in lines[2:-1]}
    assert {"python", "torch", "open_clip_torch"} <= names and names & {"faiss-cpu", "faiss-gpu-cu12"}
    assert lines[-1] == "[]"


def retriever_version() -> str:
    import retriever

    return retriever.__version__


def _fake_dist(root, name: str, version: str, home: str):
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nHome-page: {home}\n")
    return root


def test_data_retriever_in_the_same_environment_is_named_in_one_line(tmp_path):
    """weecology's Data Retriever (PyPI's `retriever`) installs the same package and command: say so once."""
    import os

    _fake_dist(tmp_path, "retriever", "3.1.0", "https://github.com/weecology/retriever")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "HF_HUB_OFFLINE": "1"}
    version = subprocess.run([sys.executable, "-m", "retriever", "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0
    assert "weecology's Data Retriever 3.1.0 is installed" in version.stdout.splitlines()[-1]
    info = subprocess.run(
        [sys.executable, "-m", "retriever", "info", str(tmp_path / "none")], capture_output=True, text=True, env=env
    )
    assert info.returncode == 1 and info.stderr.splitlines()[-1].startswith("error: ")
    warnings = [line for line in info.stderr.splitlines() if "Data Retriever" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "separate virtual environment" in warnings[0]


def test_an_older_development_install_named_retriever_is_not_a_clash(tmp_path):
    import os

    _fake_dist(tmp_path, "retriever", "0.1.0", "")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run([sys.executable, "-m", "retriever", "--version"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "Data Retriever" not in result.stdout + result.stderr
