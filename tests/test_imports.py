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
