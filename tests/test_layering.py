"""The layering rules, checked on every import statement in the code (module level or inside a
function): an AST scan, so a lazy import cannot hide a violation.

1. The library — every ``fedlora`` package except ``fedlora.commands`` — never imports the apps
   (``fedlora_server``, ``fedlora_client``) nor ``fedlora.commands``. ``fedlora.commands`` is the
   front door (the ``fedlora`` command) that launches the apps; the apps never import it.
2. Only the Flower glue imports ``flwr``: the apps, the records they exchange
   (``fedlora.protocol.messages``) and the commands that start Flower (``simulate``, ``deploy``).
   ``flwr_datasets`` is a data library, used by ``fedlora.data.partition`` only.
3. The math packages (adapters, aggregation, quant) and the kernels import nothing from the layers
   above them: data, model, training, protocol, rundir, privacy, the worker cache, commands.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"fedlora": "fedlora", "server": "fedlora_server", "client": "fedlora_client", "kernels": "fedlora_kernels"}

FLOWER_GLUE = ("fedlora_server", "fedlora_client", "fedlora.protocol.messages", "fedlora.commands.simulate",
               "fedlora.commands.deploy")
MATH = ("fedlora.adapters", "fedlora.aggregation", "fedlora.quant", "fedlora_kernels")
ABOVE_MATH = ("fedlora.data", "fedlora.model", "fedlora.training", "fedlora.protocol", "fedlora.rundir",
              "fedlora.privacy", "fedlora.worker_cache", "fedlora.commands")


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "proto/v1" in path.as_posix():  # generated protobuf code
                continue
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the importing package
                base = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                names.add(".".join([*base, node.module] if node.module else base))
            else:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations() -> list[str]:
    found = []
    for module, path in sorted(_modules().items()):
        where = path.relative_to(ROOT)
        for name in sorted(_imports(path, module)):
            if _under(module, ("fedlora",)) and not _under(module, ("fedlora.commands",)) and _under(
                    name, ("fedlora_server", "fedlora_client", "fedlora.commands")):
                found.append(f"{where}: the library imports {name}")
            if _under(module, ("fedlora_server", "fedlora_client")) and _under(name, ("fedlora.commands",)):
                found.append(f"{where}: an app imports the command line ({name})")
            if _under(name, ("flwr",)) and not _under(module, FLOWER_GLUE):
                found.append(f"{where}: imports {name}; only the Flower glue imports flwr")
            if _under(name, ("flwr_datasets",)) and module != "fedlora.data.partition":
                found.append(f"{where}: imports {name}; flwr_datasets belongs to fedlora.data.partition")
            if _under(module, MATH) and _under(name, ABOVE_MATH):
                found.append(f"{where}: a math package imports {name} from a layer above it")
    return found


def test_the_scan_sees_every_package_and_reads_lazy_imports():
    modules = _modules()
    assert {"fedlora.aggregation.fedavg", "fedlora.commands.simulate", "fedlora_server.loop", "fedlora_client.app",
            "fedlora_kernels.quant_lora"} <= set(modules)
    # the front door launches the apps from inside a function: the scan must see it
    assert "fedlora_server.app" in _imports(modules["fedlora.commands.simulate"], "fedlora.commands.simulate")


def test_layering_rules_hold():
    assert _violations() == []


def _module_level_imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The modules of ours that ``module`` depends on as a whole: imports at its top level and under
    ``if TYPE_CHECKING`` (a type-only circle is still a circle; imports inside functions are the
    way to break one on purpose), each ``from P import name`` resolved to the submodule ``P.name``
    when that is a module of ours."""
    found = set()
    body = ast.parse(path.read_text(), filename=str(path)).body
    body += [n for node in body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
             for n in node.body]
    for node in body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found.update(subs or {node.module})
    return found & modules


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {m: _module_level_imports(p, m, set(modules)) for m, p in modules.items()}
    cycles, state = [], {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open" and not _under(m, (n,)):  # a package importing its own parent: fine
                cycles.append(" → ".join(trail[trail.index(n):] + [m, n]) if n in trail else f"{m} → {n}")
            elif n not in state:
                visit(n, [*trail, m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert cycles == []
