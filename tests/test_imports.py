"""Dependency directions between the top-level folders and inside them (CONTRIBUTING.md), by an
ast scan."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    # transformers only for its T5 tokenizer (imported inside t5.load_tokenizer).
    "cogvideox_jax": {"train", "data", "configs", "tools", "torch", "optax", "diffusers"},
    "data": {"cogvideox_jax", "train", "tools", "torch"},
    "configs": {"cogvideox_jax", "train", "data", "tools", "jax", "torch"},
    "train": {"tools", "torch", "diffusers"},
    "tools": {"torch", "diffusers"},
}
# configs/validate.py checks a config against the library's facts (the variant table, attention
# kernels, remat policies, LoRA targets, sharding rules): the one config file that reads them.
ALLOWED = {"configs/validate.py": {"cogvideox_jax"}}


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_dependency_directions():
    bad = []
    for folder, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            banned = forbidden - ALLOWED.get(rel, set())
            bad += [f"{rel} imports {m}" for m in _imports(path) if m in banned]
    assert not bad, bad
    assert list((ROOT / "cogvideox_jax").rglob("*.py")), "scan found no files"


# Library modules that must not depend on the video transformer: T5 shares its layers through
# cogvideox_jax/layers.py, and the converter knows models only by config and shapes
# (cogvideox_jax/components.py builds them).
NO_TRANSFORMER = ("cogvideox_jax/t5.py", "cogvideox_jax/convert.py")


def _dotted_imports(path, package):
    """Every module an import statement anywhere in `path` names, dotted in full: for
    `from a.b import c` both a.b and a.b.c (c may be a module); relative imports resolved
    against `package`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            pkg = package.split(".")
            parts = pkg[: len(pkg) - node.level + 1] if node.level else []  # `from . import x`
            module = ".".join([*parts, *([node.module] if node.module else [])])
            yield module
            yield from (f"{module}.{a.name}" for a in node.names)


def test_t5_and_convert_do_not_import_the_transformer():
    bad = []
    for rel in NO_TRANSFORMER:
        for m in _dotted_imports(ROOT / rel, "cogvideox_jax"):
            if m == "cogvideox_jax.transformer" or m.startswith("cogvideox_jax.transformer."):
                bad.append(f"{rel} imports {m}")
    assert not bad, bad


def test_train_modules_import_each_other_without_cycles():
    """No two modules of train/ import each other, directly or through others (function-local
    imports included): the trainer reads in one direction, from the loop down to the objective."""
    modules = {f"train.{p.stem}": p for p in (ROOT / "train").glob("*.py") if p.stem != "__init__"}
    graph = {
        name: {m for m in _dotted_imports(path, "train") if m in modules and m != name}
        for name, path in modules.items()
    }
    assert len(graph) > 5, "scan found no modules"
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
