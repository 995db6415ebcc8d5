"""The package's layering: every module imports on its own, no import cycles, no private reach-ins."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "tenure"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], bool]]:
    """(module imported, names imported from it, at module level) for each import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    top_level = {id(n) for n in tree.body}
    type_checking = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, [], id(node) in top_level))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, [a.name for a in node.names], id(node) in top_level))
    return found


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "tenure.__main__"))
def test_each_module_imports_alone(module: str) -> None:
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_import_cycles_and_no_private_imports() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    private = []
    for name, path in MODULES.items():
        for mod, names, top in _imports(name, path):
            targets = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES] or ([mod] if mod in MODULES else [])
            for t in targets:
                if top:  # an import inside a function runs late and cannot make a cycle at import time
                    graph[name].add(t)
            if mod in MODULES or mod.startswith("tenure"):
                private += [f"{name} imports {mod}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not private, private

    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            # A package importing its own submodules is how packages work, not a cycle.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_layers() -> None:
    for name, path in MODULES.items():
        imported = [mod for mod, _, _ in _imports(name, path)]
        if name != "tenure.etcd":
            assert not any(m == "grpc" or m.startswith(("grpc.", "etcd3")) for m in imported), \
                f"{name} imports gRPC or the etcd stubs: only tenure.etcd may"
        if name.startswith("tenure.services"):
            assert not any(m.startswith(("tenure.etcd", "tenure.election", "tenure.members", "tenure.sidecar",
                                         "tenure.web")) for m in imported), f"{name} must know nothing of etcd"
        if name.startswith("tenure.web"):
            assert not any(m.startswith(("tenure.sidecar", "tenure.lab")) for m in imported), \
                f"{name}: the web tier reads what sidecars publish; it does not import them"
