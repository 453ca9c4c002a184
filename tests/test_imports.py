"""Layers point one way: the library never imports the demo that consumes it, and the prompt
modules import each other without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fusechat"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function-level imports too);
    `from a import b` names `a.b` as well, since b may be a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_nothing_in_the_library_imports_the_demo():
    offenders = {
        module_name(path): sorted(m for m in imports(path) if m == "fusechat.demo" or m.startswith("fusechat.demo."))
        for path in PACKAGE.rglob("*.py") if "demo" not in path.relative_to(PACKAGE).parts[:1]
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_prompt_modules_import_each_other_without_a_cycle():
    folder = PACKAGE / "prompts"
    modules = {module_name(p): p for p in folder.glob("*.py") if p.name != "__init__.py"}
    graph = {m: sorted(imports(p) & set(modules)) for m, p in modules.items()}
    assert graph["fusechat.prompts.adapters"], "the registry imports the adapters it lists"

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in graph[path[-1]]:
            if nxt == start:
                return path + [nxt]
            if nxt not in path and (found := cycle_from(start, path + [nxt])):
                return found
        return None

    cycles = [c for m in graph if (c := cycle_from(m, [m]))]
    assert cycles == []
