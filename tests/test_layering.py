"""The import graph docs/architecture.md draws: arrows only point down, and nothing imports in a circle."""

from __future__ import annotations

import ast
import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Floors, lowest first. A room may import its own modules and the rooms on the floors below; rooms that share
# a floor never import one another.
FLOORS = [
    ["specdec"],                                   # settings, errors, logs, metrics, sampling, traces, the stubs
    ["specdec.compute"],                           # KV, packed passes, kernels
    ["specdec.models", "specdec.wire"],            # loading and heads; gRPC runtime and client
    ["coordinator", "verifier_svc", "drafter_svc", "trainer", "http_svc"],
    ["specd"],
    ["bench"],
]
FLOOR = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}
# The public client (`from specdec.client import SpecdClient`) re-exports specdec.wire.client.
ROOM_OF = {"specdec.client": "specdec.wire"}


def _room(module: str) -> str:
    if module in ROOM_OF:
        return ROOM_OF[module]
    return max((room for room in FLOOR if module == room or module.startswith(room + ".")), key=len)


def _modules() -> dict[str, Path]:
    modules = {}
    for package in {room.split(".")[0] for room in FLOOR}:
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


def test_imports_point_down_and_rooms_on_a_floor_stay_apart():
    wrong = []
    for module, imported in _graph().items():
        room = _room(module)
        for target in imported:
            other = _room(target)
            if other != room and FLOOR[other] >= FLOOR[room]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that point up or across a floor:\n" + "\n".join(sorted(wrong))


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
    from specdec.wire.protos import generate

    generate(tmp_path)
    fresh, committed = tmp_path / "specdec" / "v1", ROOT / "specdec" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"stale stubs (run `make proto`): {mismatch + errors}"
