"""Unit tier: the layout the design card asks for.  The client runs alone on a minimal host, so
stap_client.py never imports the server module (the server may import the client)."""

import ast
import importlib
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imported_modules(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_client_never_imports_the_server():
    assert "stap_server" not in imported_modules(os.path.join(ROOT, "stap_client.py"))


def test_the_client_runs_alone():
    """Importing it loads no module of the server's."""
    code = ("import sys, stap_client; "
            "print('stap_server' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, check=True).stdout
    assert out.strip() == "False"


MODULES = {"stap_client": ("stap_client", "client"), "stap_server": ("stap_server", "server")}


def defined_names(path):
    """The names a module's top level defines (functions, classes, assignments)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in getattr(node, "targets", [getattr(node, "target", None)]):
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names - {"__all__"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_surface_is_every_name_without_an_underscore(module):
    """__all__ declares what other code may use: exactly the names defined without a leading
    underscore; every helper has one."""
    mod = importlib.import_module(module)
    public = {n for n in defined_names(os.path.join(ROOT, f"{module}.py")) if n[0] != "_"}
    assert set(mod.__all__) == public


def outside_sources():
    for top in ("tests", "bench", "tools"):
        for root, _, files in os.walk(os.path.join(ROOT, top)):
            yield from (os.path.join(root, f) for f in files if f.endswith(".py"))
    yield from (os.path.join(ROOT, f"{m}.py") for m in MODULES)


def test_nothing_outside_a_module_uses_its_helpers():
    """Tests, benchmarks, tools and the other module reach a module only through __all__."""
    private = re.compile(r"\b(?:stap_client|stap_server|client|server)\._[A-Za-z]\w*|"
                         r"from stap_(?:client|server) import \(?[^)\n]*\b_[A-Za-z]")
    found = []
    for path in outside_sources():
        with open(path) as f:
            text = f.read()
        found += [f"{os.path.relpath(path, ROOT)}: {m.group(0)}" for m in private.finditer(text)]
    assert found == []
