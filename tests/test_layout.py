"""The package is laid out by pipeline stage, and imports only point down the pipeline."""

import ast
from pathlib import Path

import retriever

PACKAGE = Path(retriever.__file__).parent
CORE = {"errors", "atomic", "progress"}
# Each stage may import itself, the shared core modules, and these stages (never a later one).
ALLOWED = {
    "core": set(),
    "models": set(),
    "corpus": set(),
    "index": {"models", "corpus"},
    "generate": {"models"},
    "search": {"models", "corpus", "index", "generate"},
    "prompts": {"models", "corpus", "index", "generate", "search"},
    "train": {"models", "corpus", "generate"},
    "serve": {"models", "corpus", "index", "generate", "search"},
    "cli": {"models", "corpus", "index", "generate", "search", "prompts", "train", "serve"},
}


def stage_of(module: str) -> str | None:
    """The stage of a dotted module name under `retriever`, or None for the package root."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    return "core" if parts[0] in CORE else parts[0]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every `retriever...` module that a file imports, at any depth (lazy imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "retriever"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "retriever":
            if node.module == "retriever":  # `from retriever import x`: x is a submodule or a root name
                found += [
                    (node.lineno, f"retriever.{a.name}")
                    if (PACKAGE / a.name).exists() or (PACKAGE / f"{a.name}.py").exists()
                    else (node.lineno, "retriever")
                    for a in node.names
                ]
            else:
                found.append((node.lineno, node.module))
    return found


def modules() -> list[tuple[Path, str]]:
    return [
        (path, ".".join(("retriever", *path.relative_to(PACKAGE).with_suffix("").parts)))
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def test_every_module_belongs_to_a_known_stage():
    for path, module in modules():
        stage = stage_of(module)
        if stage is None or path.name in ("__init__.py", "__main__.py") and path.parent == PACKAGE:
            continue
        assert stage in ALLOWED, f"{path}: {stage!r} is not a stage; add it to ALLOWED in this test"


def test_imports_point_down_the_pipeline():
    bad = []
    for path, module in modules():
        if path.parent == PACKAGE and path.name in ("__init__.py", "__main__.py"):
            continue  # the root re-exports lazily from every stage
        stage = stage_of(module)
        for line, target in imports_of(path):
            target_stage = stage_of(target)
            if target_stage is None:
                if stage != "cli":
                    bad.append(f"{path.relative_to(PACKAGE)}:{line} imports the package root")
                continue
            if target_stage not in {stage, "core"} | ALLOWED[stage]:
                bad.append(f"{path.relative_to(PACKAGE)}:{line} ({stage}) imports {target} ({target_stage})")
    assert not bad, "imports against the pipeline's direction:\n" + "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path):
    """The graph walk finds lazy imports inside functions (so the test above can fail)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from retriever.serve.app import create_app\n")
    assert imports_of(source) == [(2, "retriever.serve.app")]
    assert "serve" not in ALLOWED["index"]


def test_no_module_shadows_a_subpackage():
    for path, _ in modules():
        if path.name != "__init__.py":
            assert not (path.with_suffix("")).is_dir(), f"{path} sits beside a package of the same name"
