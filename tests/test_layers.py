"""The layers of docs/architecture.md, enforced: a module imports only its own layer and those below.

Every ``import`` in zoo/ is read, function-level (lazy) imports included. The one exception is the
registry's loading of the built-in families (its ``_load_builtins`` imports them so that they
register themselves: a registration trigger, not a use).
"""

import ast
from pathlib import Path

ZOO = Path(__file__).resolve().parent.parent / "zoo"

# Lowest first; each layer may import itself and every layer before it.
LAYERS = [
    ("foundation", ("zoo.version", "zoo.config", "zoo.errors", "zoo.progress", "zoo.io", "zoo.optim", "zoo.fit",
                    "zoo.rundir")),
    ("registry", ("zoo.registry",)),
    ("layers and objectives", ("zoo.nn", "zoo.diffusion")),
    ("components", ("zoo.tokenizers", "zoo.generators", "zoo.data")),
    ("recipe", ("zoo.recipe",)),
    ("pipeline", ("zoo.pipeline",)),
    ("hub", ("zoo.hub",)),
    ("applications", ("zoo.eval", "zoo.upscale")),
    ("train", ("zoo.train",)),
    ("commands", ("zoo.cli", "zoo")),
]
ALLOWED = {("zoo.registry", "_load_builtins")}  # (module, function) whose imports are registration triggers


def layer_of(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(ZOO.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(imported module, enclosing function) for every zoo import in ``path``."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((alias.name, function) for alias in child.names if alias.name.split(".")[0] == "zoo")
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.split(".")[0] == "zoo":
                    found.append((child.module, function))
            visit(child, inner)

    visit(tree, None)
    return found


def test_every_import_points_down_the_layers():
    upward = []
    for path in sorted(ZOO.rglob("*.py")):
        module = module_name(path)
        for target, function in imports(path):
            if (module, function) in ALLOWED:
                continue
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})" + (f" in {function}()" if function else ""))
    assert upward == [], "\n".join(upward)


def test_a_pipeline_and_a_recipe_know_nothing_of_the_hub():
    for module in ("pipeline.py", "recipe.py"):
        assert not [t for t, _ in imports(ZOO / module) if t.startswith("zoo.hub")], module
