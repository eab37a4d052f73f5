"""Dependency directions between the top-level folders (STYLE.md section 8.1), by an ast scan."""

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
            bad += [
                f"{path.relative_to(ROOT)} imports {m}" for m in _imports(path) if m in forbidden
            ]
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
