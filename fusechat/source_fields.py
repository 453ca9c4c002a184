"""The fields of an installed package's dataclass, read from its source file without importing it.

A recipe passes options straight to vLLM (`engine_options`) and to TRL (`sft.trl_args`,
`dpo.trl_args`); checking their names and types when the recipe is loaded needs those libraries'
argument dataclasses. Importing them is what makes that slow: `import vllm.engine.arg_utils` took
9-10 s here and `import trl.trainer.sft_config, trl.trainer.dpo_config` 7-8 s (both pull in torch),
against ~0.3 s for all of `fusechat recipe validate`. Parsing the few source files with `ast` takes
~30 ms per file. The price is that only annotations built from builtins (int, float, bool, str,
list, dict, Literal, unions, None) become checked types; a field annotated with the library's own
classes or aliases is accepted as given and left to the library. tests/test_recipe.py compares the
names read here with the imported dataclasses, so a change of layout in a new release shows up.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import typing
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError, create_model


class Unreadable(Exception):
    """The fields cannot be read on this machine (package not installed, or its files changed shape)."""


def read_fields(chain: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Name -> type of the annotated fields of a dataclass and its bases, given as (package, file
    inside the package, class name) from the base to the class itself; later classes override."""
    fields: dict[str, Any] = {}
    for package, file, name in chain:
        for node in _class(package, file, name).body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                fields[node.target.id] = _type(node.annotation)
    return {k: v for k, v in fields.items() if not k.startswith("_")}


def read_init_params(package: str, file: str, name: str) -> dict[str, Any]:
    """Name -> type of the named parameters of a class's `__init__` (not *args/**kwargs)."""
    init = next((n for n in _class(package, file, name).body if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
                None)
    if init is None:
        raise Unreadable(f"{package}: {name} has no __init__ in {file}")
    return {a.arg: (_type(a.annotation) if a.annotation is not None else Any)
            for a in init.args.args[1:] + init.args.kwonlyargs}


def _class(package: str, file: str, name: str) -> ast.ClassDef:
    spec = importlib.util.find_spec(package)  # a top-level package is found without being imported
    if spec is None or not spec.submodule_search_locations:
        raise Unreadable(f"{package} is not installed here")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError) as e:
        raise Unreadable(f"cannot read {path}: {e}") from None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise Unreadable(f"no class {name} in {path}")


# YAML has no sets or tuples, and writes a path as a string
_BUILTIN = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict, "list": list,
            "set": list, "tuple": list, "Path": str}


def _type(node: ast.expr) -> Any:
    """An annotation as a type pydantic can check, as far as it is built from builtins; Any otherwise."""
    if isinstance(node, ast.Constant):
        if node.value is None:
            return type(None)
        if isinstance(node.value, str):  # a quoted annotation
            try:
                return _type(ast.parse(node.value, mode="eval").body)
            except SyntaxError:
                return Any
        return Any
    if isinstance(node, ast.Name):
        return _BUILTIN.get(node.id, Any)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _type(node.left), _type(node.right)
        return Any if Any in (left, right) else Union[left, right]
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        kind = node.value.id
        if kind == "Literal" and all(isinstance(a, ast.Constant) for a in args):
            return Literal[tuple(a.value for a in args)]
        if kind == "Optional":
            inner = _type(args[0])
            return Any if inner is Any else typing.Optional[inner]
        if kind == "Union":
            parts = [_type(a) for a in args]
            return Any if Any in parts else Union[tuple(parts)]
        if kind in ("list", "set") and len(args) == 1:
            return list[_type(args[0])]
        if kind == "dict" and len(args) == 2:
            return dict[_type(args[0]), _type(args[1])]
        return _BUILTIN.get(kind, Any)
    return Any


def options_model(name: str, types: dict[str, Any], base: type[BaseModel] | None = None) -> type[BaseModel]:
    """A strict pydantic model with every field optional: checks names (unknown ones are errors)
    and, where the type is known, values."""
    config = None if base is not None else ConfigDict(extra="forbid", strict=True)
    return create_model(name, __base__=base, __config__=config, **{k: (t, None) for k, t in types.items()})


def problems(model: type[BaseModel], values: dict[str, Any], what: str) -> list[tuple[str, str]]:
    """(key path, message) for every value `model` rejects, e.g. (".max_model_len", "Input should
    be a valid integer, got '4k'"); an unknown name gets the closest known one as a suggestion."""
    try:
        model.model_validate(values)
    except ValidationError as e:
        out = []
        for err in e.errors():
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            msg = err["msg"] if err["type"] == "missing" else f"{err['msg']}, got {err['input']!r}"
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(str(err["loc"][0]), list(model.model_fields), n=1)
                msg = f"unknown {what}" + (f"; did you mean {close[0]!r}?" if close else "")
            out.append((path, msg))
        return out
    return []
