"""The layering of megads/, read from the source with `ast`: model/ and fp8/ import nothing from
parallel/ (the weight-gradient deferral lives in model/deferral.py), config.py imports no other
megads module, and no megads module imports itself back through others. Every import statement
counts: top-level, inside functions and under TYPE_CHECKING."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megads"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, package: str, modules: set[str]) -> set[str]:
    """The modules of `modules` that `source` imports anywhere; relative imports resolve against
    `package`. `from a import b` names module a.b when that is a module, else a."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {name: imports_of(path.read_text(), name if path.name == "__init__.py" else name.rpartition(".")[0],
                             set(paths))
            for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a closed path (first module repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        path.append(module)
        for target in sorted(graph[module]):
            if target in path:
                return path[path.index(target):] + [target]
            if target not in done and (cycle := visit(target)):
                return cycle
        done.add(path.pop())
        return None

    for module in sorted(graph):
        if module not in done and (cycle := visit(module)):
            return cycle
    return None


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_walker_sees_every_kind_of_import():
    modules = {"megads.a", "megads.a.b", "megads.a.c", "megads.d", "megads.e"}
    source = ("import torch\nfrom megads.a import b, helper\nfrom . import c\n"
              "def f():\n    from ..d import g\n"
              "if TYPE_CHECKING:\n    import megads.e\n")
    assert imports_of(source, "megads.a", modules) == {"megads.a", "megads.a.b", "megads.a.c", "megads.d", "megads.e"}
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"y"}}) == ["y", "z", "y"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_model_and_fp8_import_nothing_from_parallel():
    graph = import_graph()
    assert "megads.model.layers" in graph["megads.model.moe"]          # the graph is not empty
    offending = {module: sorted(t for t in targets if under(t, "megads.parallel"))
                 for module, targets in graph.items() if under(module, "megads.model") or under(module, "megads.fp8")}
    assert {module: targets for module, targets in offending.items() if targets} == {}


def test_config_imports_no_other_megads_module():
    assert import_graph()["megads.config"] == set()


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ----------------------------------------------------------------------------- declared behaviour

PLACEMENT_TAGS = {"tensor_model_parallel", "partition_dim", "expert_parallel", "expert_offset", "pipeline_mirror",
                  "ds_pipe_replicated", "model_parallel", "sequence_parallel"}


def megads_sources() -> dict[str, ast.AST]:
    return {str(p.relative_to(PACKAGE.parent)): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def attribute_uses(tree: ast.AST) -> list[tuple[str, bool, ast.AST]]:
    """(attribute name, assigned?, node) of every `x.name` and `getattr / setattr / hasattr(x, "name")`."""
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            uses.append((node.attr, isinstance(node.ctx, ast.Store), node))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            uses.append((node.args[1].value, node.func.id == "setattr", node))
    return uses


def test_no_placement_tag_on_a_tensor_and_no_class_swap():
    """Placement lives in the parallel plan. The only tensor attributes megads writes are the ones
    DeepSpeed reads (its adapter); it reads none; no object's class is swapped."""
    found = []
    for path, tree in megads_sources().items():
        for name, stored, node in attribute_uses(tree):
            if name == "__class__" and stored:
                found.append(f"{path}:{node.lineno} assigns __class__")
            elif name in PLACEMENT_TAGS and not (stored and path == "megads/parallel/deepspeed_adapter.py"):
                if not (path == "megads/config.py" or (name == "sequence_parallel" and not stored)):
                    found.append(f"{path}:{node.lineno} {'writes' if stored else 'reads'} {name}")
    assert found == []


def test_layers_get_their_strategy_from_the_builder_only():
    """A layer's `strategy` is assigned in its own constructor (the single-process default) and
    otherwise only by the model builder; nothing in megads/ imports unittest.mock."""
    found = []
    for path, tree in megads_sources().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path}:{node.lineno} imports {n}" for n in names if n and n.startswith("unittest")]
        for name, stored, node in attribute_uses(tree):
            if name == "strategy" and stored and path != "megads/parallel/builder.py" \
                    and not (path.startswith("megads/model/") and isinstance(node, ast.Attribute)
                             and isinstance(node.value, ast.Name) and node.value.id == "self"):
                found.append(f"{path}:{node.lineno} sets a strategy")
    assert found == []
