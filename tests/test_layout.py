"""The layout keeps its promises: model/ and search/ stand without the server, and the docs stay true."""

import ast
import subprocess
import sys

import pytest
from helpers import ROOT

PACKAGE = ROOT / "clap_ws"
SERVER_LAYER = {"protocol", "audio", "batching", "inference", "service", "server", "cli", "build", "extractor"}


def imported_modules(path, source=None):
    """The clap_ws modules a file imports, as names under clap_ws (``model.clap``, ``errors`` ...)."""
    package = path.relative_to(PACKAGE).parent.parts
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] if node.module else [f"{module}.{a.name}".lstrip(".") for a in node.names]
                yield from names
            elif node.module and node.module.startswith("clap_ws"):
                yield node.module.removeprefix("clap_ws").lstrip(".")
        elif isinstance(node, ast.Import):
            yield from (a.name.removeprefix("clap_ws").lstrip(".") for a in node.names if a.name.startswith("clap_ws"))


@pytest.mark.parametrize("package", ["model", "search", "evaluation"])
def test_model_search_and_evaluation_never_import_the_server_layer(package):
    found = {}
    for path in (PACKAGE / package).rglob("*.py"):
        for module in imported_modules(path):
            if module.split(".")[0] in SERVER_LAYER:
                found.setdefault(str(path.relative_to(ROOT)), []).append(module)
    assert not found, found


def test_the_checker_sees_a_violation():
    source = "from ..service import Service\nfrom . import index\nimport clap_ws.server\n"
    assert set(imported_modules(PACKAGE / "search" / "x.py", source)) == {"service", "search.index", "server"}


def test_public_imports_still_work():
    code = ("from clap_ws import CLAPExtractor; from clap_ws.model import ClapModel; import clap_ws; "
            "from importlib.metadata import version; print(clap_ws.__version__, version('clap-ws'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ours, installed = result.stdout.split()
    from packaging.version import Version

    assert str(Version(ours)) == ours == installed  # a PEP 440 version, the one the installed package reports


def test_configuration_page_is_generated_from_the_parser():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "configuration.py"), "--check"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_no_module_docstring_carries_a_benchmark_figure():
    """Figures rot in code; they live in docs/ with their date and machine."""
    import re

    figure = re.compile(r"\d+(\.\d+)?\s?(ms|µs|GB/s|GFLOP/s)\b|\d+(\.\d+)?x (torch|eager|faster|slower)|measured")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node) or ""
                if figure.search(doc):
                    offenders.append(f"{path.relative_to(ROOT)}:{getattr(node, 'name', 'module')}")
    assert not offenders, offenders


def test_every_name_the_architecture_page_gives_exists():
    """docs/architecture.md names functions and methods (`module.name`, `Class.method`): each must exist."""
    import importlib
    import inspect
    import pkgutil
    import re

    import clap_ws

    modules = {m.name.removeprefix("clap_ws."): importlib.import_module(m.name)
               for m in pkgutil.walk_packages(clap_ws.__path__, "clap_ws.") if not m.name.endswith("__main__")}
    classes = {name: obj for module in modules.values() for name, obj in vars(module).items() if inspect.isclass(obj)}
    text = (ROOT / "docs" / "architecture.md").read_text()
    names = [n for n in re.findall(r"`([A-Za-z_][\w.]*\.[A-Za-z_]\w*)`", text)
             if not n.endswith((".py", ".md", ".js", ".html", ".css"))]
    assert len(names) >= 8  # the page still names things

    def exists(name: str) -> bool:
        parts = name.split(".")
        for split in range(len(parts) - 1, 0, -1):  # the longest module (or class) that exists, then attributes
            obj = modules.get(".".join(parts[:split])) or (classes.get(parts[0]) if split == 1 else None)
            if obj is not None:
                for attr in parts[split:]:
                    if not hasattr(obj, attr):
                        return False
                    obj = getattr(obj, attr)
                return True
        return False

    assert not [n for n in names if not exists(n)]
