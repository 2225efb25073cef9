"""Unit tier: the layout the design card asks for.  The client runs alone on a minimal host, so
stap_client.py never imports the server module (the server may import the client)."""

import ast
import os
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
