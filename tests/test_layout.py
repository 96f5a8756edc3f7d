"""The package layout's rules, read from the import graph (every import, lazy ones included).

- no import cycles between moed's modules;
- `ipc/` imports nothing of moed's other packages, nor MLX;
- `workers/` import only `ipc/` (and themselves), never MLX;
- `client/` imports neither MLX nor the daemon when imported (its engine verbs import lazily);
- the engine imports no zmq (sockets live at the edges: io/, service/, dist/).
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"ipc": "moed.ipc", "workers": "moed.workers", "client": "moed.client", "daemon": "moed.daemon"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[parts[0]].split(".")[0], *[PACKAGES[parts[0]].split(".")[1]], *parts[1:]])


def _imports(path: Path, name: str) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for n in tree.body:  # a try/if at module level still runs at import time
        if isinstance(n, (ast.Try, ast.If)):
            top |= {id(m) for m in ast.walk(n)}
    out = []
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            if node.module is None or node.level:  # `from . import x` / `from .m import x`
                out += [(f"{mod}.{a.name}", id(node) in top) for a in node.names]
            out.append((mod, id(node) in top))
    return out


def _graph():
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    mods = {_module_name(p): p for p in files}
    graph = {}
    for name, path in mods.items():
        edges = []
        for mod, top in _imports(path, name):
            if mod.startswith("moed."):
                # `from moed.x import y` may name a module or a symbol: the longest module prefix
                while mod not in mods and "." in mod:
                    mod = mod.rsplit(".", 1)[0]
            edges.append((mod, top))
        graph[name] = edges
    return mods, graph


def test_no_import_cycles():
    mods, graph = _graph()
    internal = {m: {d for d, _ in edges if d in mods and d != m} for m, edges in graph.items()}
    # a package's __init__ importing its own modules is not a cycle of responsibility
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for d in internal[m]:
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(internal):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_ipc_imports_nothing_of_moed_nor_mlx():
    _, graph = _graph()
    bad = [f"{m} imports {d}" for m, edges in graph.items() if m.startswith("moed.ipc")
           for d, _ in edges if (d.startswith("moed.") and not d.startswith("moed.ipc")) or d.startswith("mlx")]
    assert not bad, bad


def test_workers_import_only_ipc():
    _, graph = _graph()
    bad = [f"{m} imports {d}" for m, edges in graph.items() if m.startswith("moed.workers")
           for d, _ in edges if (d.startswith("moed.") and not d.startswith(("moed.ipc", "moed.workers")))
           or d.startswith("mlx")]
    assert not bad, bad


def test_engine_imports_no_zmq():
    _, graph = _graph()
    bad = [f"{m} imports {d}" for m, edges in graph.items() if m.startswith("moed.daemon.engine")
           for d, _ in edges if d.split(".")[0] == "zmq"]
    assert not bad, bad


def test_client_imports_neither_mlx_nor_the_daemon():
    _, graph = _graph()
    bad = [f"{m} imports {d} at import time" for m, edges in graph.items() if m.startswith("moed.client")
           for d, top in edges if top and (d.startswith(("mlx", "moed.daemon")))]
    assert not bad, bad
    # and for real: importing every client module loads neither
    code = ("import sys, moed.client, moed.client.cli, moed.client.top, moed.client.chat, moed.client.control, "
            "moed.client.ps, moed.client.dashboard, moed.client.view, moed.client.launch; "
            "bad = [m for m in sys.modules if m.startswith(('mlx', 'moed.daemon'))]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_cli_dispatches_engine_verbs_by_a_table():
    """Every engine verb the parser offers is a function of moed.daemon.verbs, reached by name."""
    import argparse

    import moed.daemon.verbs as verbs
    from moed.client.cli import ENGINE_VERBS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(ENGINE_VERBS) <= set(sub.choices)
    assert all(callable(getattr(verbs, fn)) for fn in ENGINE_VERBS.values())
