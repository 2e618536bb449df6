"""The architecture, checked: provisioning/ has layers and no import cycles.

Every import of every module counts, function-level ones included (they hide
cycles from Python, not from this test). A module may import its own layer or
any layer below it, never one above:

    cli       provisioning.cli.*           parse -> call -> print
    commands  provisioning.commands        one function per verb (the library's front door)
    services  servers, reconcile, ...      whole operations on one server or one bot
    leaves    everything else              catalog reads, DDL, files, names, arithmetic
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "provisioning"
LAYERS = ["leaves", "services", "commands", "cli"]  # bottom to top
SERVICES = {"servers", "reconcile", "declarative", "doctor", "restore", "compose", "access", "watch", "archiving"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    rest = module.removeprefix("provisioning").lstrip(".")
    if rest == "cli" or rest.startswith("cli."):
        return "cli"
    if rest == "commands":
        return "commands"
    return "services" if rest in SERVICES else "leaves"


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The provisioning modules ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("provisioning")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            elif node.module and node.module.startswith("provisioning"):
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != module}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_import_graph_is_read_from_every_module():
    g = graph()
    # the function-level imports are seen: the CLI imports the library only inside its commands
    assert "provisioning.commands" in g["provisioning.cli.bots"]
    assert {"provisioning.reconcile", "provisioning.servers"} <= g["provisioning.commands"]
    assert len(g) >= 25


def test_no_module_imports_a_layer_above_its_own():
    wrong = [f"{src} ({layer(src)}) imports {dst} ({layer(dst)})"
             for src, targets in graph().items() for dst in targets
             if LAYERS.index(layer(dst)) > LAYERS.index(layer(src))]
    assert wrong == []


def test_there_is_no_import_cycle():
    g = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)


def test_a_cycle_and_an_upward_import_would_be_caught(tmp_path):
    """The checks can fail: a made-up leaf importing the commands layer, and back."""
    pkg = tmp_path / "provisioning"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "names.py").write_text("def f():\n    from .commands import g\n")
    (pkg / "commands.py").write_text("from .names import f\n")
    known = {module_name_in(tmp_path, p): p for p in pkg.rglob("*.py")}
    g = {name: imports(name, path, known) for name, path in known.items()}
    assert g["provisioning.names"] == {"provisioning.commands"}
    assert g["provisioning.commands"] == {"provisioning.names"}
    assert LAYERS.index(layer("provisioning.commands")) > LAYERS.index(layer("provisioning.names"))


def module_name_in(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
