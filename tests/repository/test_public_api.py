"""One import path per public name: a module's ``__all__`` lists only what the module defines.

The exceptions are the package facades, which exist to gather names: ``rnnreg`` (the whole
public API, its toolkit names loaded on first use) and ``rnnreg.nn`` (the layers, dropout
primitives, strategies and engine names). Any other module that lists a sibling's name in its
``__all__``, or code in the package that imports a name through a module that only re-exports
it, gives that name a second path. The source is read with ``ast``, so the checks see what a
module *defines* (assignments, functions, classes, submodules of a package), not what it
happens to hold after its imports ran.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import rnnreg
import rnnreg.nn

PACKAGE = Path(rnnreg.__file__).parent
FACADES = ("rnnreg", "rnnreg.nn")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def defined_names(tree: ast.Module, path: Path | None = None) -> set[str]:
    """The names a module's top level binds by assignment, ``def`` or ``class`` (also inside a
    top-level ``if``/``try``/``with``), plus, for a package's ``__init__.py``, its submodules.
    Imported names are not definitions."""
    names: set[str] = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(n.id for t in targets for n in ast.walk(t)
                             if isinstance(n, ast.Name))
            elif isinstance(node, ast.If | ast.Try | ast.With):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, block, []))
            elif isinstance(node, ast.ExceptHandler):
                visit(node.body)

    visit(tree.body)
    if path is not None and path.name == "__init__.py":
        names.update(child.stem for child in path.parent.iterdir()
                     if child.suffix == ".py" and child.name != "__init__.py")
        names.update(child.name for child in path.parent.iterdir()
                     if (child / "__init__.py").is_file())
    return names


def declared_all(tree: ast.Module) -> list[str] | None:
    """The literal ``__all__`` of a module, None where it has none. A computed ``__all__``
    cannot be checked from the source, so it is an error outside the facades."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                return list(ast.literal_eval(node.value))
            except ValueError as error:
                raise AssertionError("__all__ is not a literal list of strings") from error
    return None


def foreign_names(source: str, path: Path | None = None) -> list[str]:
    """The names ``__all__`` lists that the module does not define."""
    tree = ast.parse(source)
    return [name for name in declared_all(tree) or [] if name not in defined_names(tree, path)]


def indirect_imports(source: str, *, user: bool = False) -> list[str]:
    """``module.name`` for each ``from rnnreg... import name`` whose module does not define the
    name (it re-exports it, or it is not there at all). For a ``user`` (tests, benchmarks,
    tools: code outside the package) the facades also offer their ``__all__``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                and node.module.split(".")[0] == "rnnreg"):
            continue
        path = MODULES.get(node.module)
        defined = set() if path is None else defined_names(ast.parse(path.read_text()), path)
        if user and node.module in FACADES:
            defined |= set(importlib.import_module(node.module).__all__)
        found.extend(f"{node.module}.{alias.name}" for alias in node.names
                     if alias.name not in defined)
    return found


def test_the_checks_catch_a_re_export():
    """The oracle itself: a module re-exporting an imported name is caught, a module listing
    its own definitions is not."""
    shim = ("from rnnreg.nn.engines import engine_for\n"
            "__all__ = ['engine_for', 'LOCAL']\nLOCAL = 1\n")
    assert foreign_names(shim) == ["engine_for"]
    assert foreign_names("__all__ = ['f']\ndef f():\n    pass\n") == []
    assert indirect_imports("from rnnreg.nn.layers import engine_for, LSTM\n") == [
        "rnnreg.nn.layers.engine_for"]
    assert indirect_imports("from rnnreg.nn import loops\nfrom rnnreg.nn.engines import FUSED\n"
                            ) == []
    assert indirect_imports("from rnnreg.nn import FUSED\n") == ["rnnreg.nn.FUSED"]
    assert indirect_imports("from rnnreg.nn import FUSED\n", user=True) == []


@pytest.mark.parametrize("module", [m for m in MODULES if m not in FACADES])
def test_all_lists_only_names_the_module_defines(module):
    path = MODULES[module]
    assert foreign_names(path.read_text(), path) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_package_imports_each_name_from_its_defining_module(module):
    assert indirect_imports(MODULES[module].read_text()) == []


USERS = sorted(path for folder in ("tests", "benchmarks", "tools")
               for path in (PACKAGE.parent / folder).rglob("*.py"))


@pytest.mark.parametrize("path", USERS, ids=lambda path: str(path.relative_to(PACKAGE.parent)))
def test_tests_benchmarks_and_tools_import_through_public_paths(path):
    """Outside the package a name comes from its defining module or from a facade."""
    assert indirect_imports(path.read_text(), user=True) == []


def _defining_modules(name: str) -> list[str]:
    return [module for module, path in MODULES.items() if module not in FACADES
            and name in (declared_all(ast.parse(path.read_text())) or [])]


@pytest.mark.parametrize("facade", [rnnreg, rnnreg.nn], ids=FACADES)
def test_every_facade_name_is_its_defining_modules_public_name(facade):
    """Each name a facade offers resolves, and is the very object that exactly one module
    defines and lists in its own ``__all__`` (so the facade adds a path, never a name)."""
    assert len(facade.__all__) == len(set(facade.__all__))
    for name in facade.__all__:
        value = getattr(facade, name)
        if isinstance(value, type(rnnreg)):  # a submodule, e.g. rnnreg.nn.functional
            assert value.__name__ == f"rnnreg.nn.{name}"
            continue
        owners = _defining_modules(name)
        assert len(owners) == 1, (name, owners)
        assert getattr(importlib.import_module(owners[0]), name) is value, name


def test_the_nn_facade_offers_the_engine_names_and_masks():
    """Users find the engine choice and the masks on rnnreg.nn; DropoutMasks also on rnnreg."""
    for name in ("engine_for", "FUSED", "CPP_LOOP", "TRITON_GRAPHS", "TRITON_LOOP",
                 "PYTHON_LOOP", "DropoutMasks"):
        assert name in rnnreg.nn.__all__, name
    assert "DropoutMasks" in rnnreg.__all__
    assert rnnreg.nn.engine_for(rnnreg.LSTM(2, 3)) == rnnreg.nn.FUSED
