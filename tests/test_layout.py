"""The package's shape: no import cycle, no private name taken across modules, the TRL private methods we override
still exist, and the old import paths still work (with a DeprecationWarning)."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "asft"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(module imported, names taken from it) for every import in the file, lazy ones included; relative imports
    resolved against the file's package; those under `if TYPE_CHECKING:` left out."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports for type checkers only (as lint-imports is configured) are not imports
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    package = _module_name(path).split(".") if path.name == "__init__.py" else _module_name(path).split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for module, names in _imports(path):
            for target in [module] + [f"{module}.{n}" for n in names]:
                if target in modules and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def test_the_import_graph_has_no_cycle():
    graph, state, stack = _graph(), {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_module_takes_another_modules_private_name():
    taken = []
    for path in SRC.rglob("*.py"):
        for module, names in _imports(path):
            if module.startswith("asft") and module != _module_name(path):
                taken += [
                    f"{_module_name(path)}: {module}.{n}" for n in names if n.startswith("_") and not n.startswith("__")
                ]
    assert not taken, taken


@pytest.mark.parametrize(
    "owner, parent",
    [
        ("asft.training.trainer:AnchoredSFTTrainer", "trl:SFTTrainer"),
        ("asft.rl.trainer:AsftGRPOTrainer", "trl:GRPOTrainer"),
    ],
)
def test_the_private_trl_methods_we_rely_on_still_exist(owner, parent):
    module, _ = owner.split(":")
    names = importlib.import_module(module).TRL_PRIVATE_NAMES
    parent_module, parent_name = parent.split(":")
    cls = getattr(importlib.import_module(parent_module), parent_name)
    missing = [n for n in names if not callable(getattr(cls, n, None))]
    assert not missing, f"{parent} (TRL) no longer has {', '.join(missing)}: {owner}'s override must be re-read"


@pytest.mark.parametrize(
    "old, name",
    [
        ("asft.trainer", "AnchoredSFTTrainer"),
        ("asft.config", "AnchoredSFTConfig"),
        ("asft.reference", "FrozenModelReference"),
    ],
)
def test_old_import_paths_still_work_with_a_warning(old, name):
    import sys

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught)
    assert getattr(module, name) is getattr(importlib.import_module(f"asft.training.{old.split('.')[1]}"), name)


def test_new_and_kept_public_paths():
    from asft import AnchoredSFTConfig, AnchoredSFTTrainer
    from asft.cache import build_cache  # noqa: F401
    from asft.data import load_examples, tokenize  # noqa: F401
    from asft.fused import fused_token_loss  # noqa: F401
    from asft.objectives import token_loss  # noqa: F401
    from asft.rl import RLArguments  # noqa: F401

    assert AnchoredSFTTrainer.__module__ == "asft.training.trainer"
    assert AnchoredSFTConfig.__module__ == "asft.training.config"
