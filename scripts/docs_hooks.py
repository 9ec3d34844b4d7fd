"""mkdocs hooks: the CLI reference and the HTTP API reference are generated at build time.

A page containing `<!-- generated: cli -->` gets every command's help, from the typer app the
`retriever` command runs; `<!-- generated: openapi -->` gets the endpoints of the OpenAPI schema
that `retriever.serve.app.create_app` builds (no model is loaded: the schema needs none), and the
schema itself is added to the site as openapi.json. So neither page can drift from the code.
"""

from __future__ import annotations

import json
from typing import Any

CLI_MARKER = "<!-- generated: cli -->"
OPENAPI_MARKER = "<!-- generated: openapi -->"


def cli_reference() -> str:
    """Markdown for every command and group of the `retriever` CLI."""
    import typer
    from typer.cli import get_docs_for_click

    from retriever.cli import app

    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="retriever")
    docs = get_docs_for_click(obj=command, ctx=ctx, name="retriever", title="`retriever`")
    # The page has its own title: the generated headings start one level down.
    return "\n".join("#" + line if line.startswith("#") else line for line in docs.strip().splitlines()) + "\n"


def openapi_schema() -> dict[str, Any]:
    from retriever.search.api import Retriever
    from retriever.serve.app import create_app

    # The routes read the retrievers only when answering, so an empty one builds the same schema.
    return create_app({"toyworld": Retriever(None, None)}).openapi()


def _schema_text(schema: dict[str, Any]) -> str:
    return "```json\n" + json.dumps(schema, indent=2, ensure_ascii=False) + "\n```\n"


def openapi_reference(schema: dict[str, Any]) -> str:
    """Markdown for each path and method of an OpenAPI schema: summary, parameters, body, responses."""
    out = []
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            out.append(f"### `{method.upper()} {path}`\n")
            summary = op.get("summary", "")
            description = op.get("description", "")
            if description and description != summary:
                out.append(f"{description}\n")
            elif summary:
                out.append(f"{summary}\n")
            params = op.get("parameters", [])
            if params:
                out.append("| parameter | in | required | type |\n| --- | --- | --- | --- |")
                for p in params:
                    kind = p.get("schema", {}).get("type", "")
                    out.append(
                        f"| `{p['name']}` | {p.get('in', '')} | {'yes' if p.get('required') else 'no'} | {kind} |"
                    )
                out.append("")
            body = op.get("requestBody", {}).get("content", {})
            for content_type, media in body.items():
                out.append(f"Request body, `{content_type}`:\n")
                if "schema" in media:
                    out.append(_schema_text(media["schema"]))
            responses = op.get("responses", {})
            if responses:
                out.append("| status | meaning |\n| --- | --- |")
                for status, response in responses.items():
                    out.append(f"| {status} | {response.get('description', '')} |")
                out.append("")
    components = schema.get("components", {}).get("schemas", {})
    if components:
        out.append("### Schemas\n")
        for name, component in components.items():
            out.append(f"#### `{name}`\n")
            out.append(_schema_text(component))
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if OPENAPI_MARKER in markdown:
        markdown = markdown.replace(OPENAPI_MARKER, openapi_reference(openapi_schema()))
    return markdown


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    schema = json.dumps(openapi_schema(), indent=2, ensure_ascii=False) + "\n"
    files.append(File.generated(config, "openapi.json", content=schema))
    return files
