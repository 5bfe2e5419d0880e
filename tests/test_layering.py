"""The import graph docs/architecture.md draws: arrows only point down, and nothing imports in a circle."""

from __future__ import annotations

import ast
import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lower number = lower layer. A package may import its own layer's package and anything below,
# except that the services in the middle never import one another.
LAYERS = {"specdec": 0, "coordinator": 1, "verifier_svc": 1, "drafter_svc": 1, "trainer": 1, "http_svc": 1, "specd": 2,
          "bench": 3}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            if "v1" in path.parts:  # generated stubs import only protobuf and grpc
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_imports_point_down_and_services_stay_apart():
    wrong = []
    for module, imported in _graph().items():
        package = module.split(".")[0]
        for target in imported:
            other = target.split(".")[0]
            if LAYERS[other] > LAYERS[package] or (LAYERS[other] == LAYERS[package] == 1 and other != package):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that point up or across services:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _graph()
    visiting, done, cycles = set(), set(), []

    def visit(node: str, path: list[str]) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append(" -> ".join(path[path.index(node):] + [node]))
            return
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_coordinator_does_not_load_torch():
    probe = "import sys, coordinator.server; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_http_tier_loads_neither_torch_nor_a_tokenizer():
    probe = "import sys, http_svc.server; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_committed_stubs_match_the_protos(tmp_path):
    from specdec.protos import generate

    generate(tmp_path)
    fresh, committed = tmp_path / "specdec" / "v1", ROOT / "specdec" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"stale stubs (run `make proto`): {mismatch + errors}"
