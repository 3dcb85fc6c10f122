"""Every import in the package points down the layers of the README's layout table, never up."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "diffusion"

# Bottom to top, as README.md's "How the code is laid out" lists them; a module may import from its own
# row and the rows below it.
LAYERS = [
    {"errors", "files", "devices", "images"},
    {"data"},
    {"text"},
    {"model"},
    {"config", "runs", "card"},
    {"maps"},
    {"sampling"},
    {"training"},
    {"evaluation", "viewer", "demo"},
]


def layer_of(module: str) -> int:
    """diffusion.<part>[.<rest>] -> the index of the row holding <part>."""
    part = module.split(".")[1]
    return next(i for i, row in enumerate(LAYERS) if part in row)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `diffusion.*` import in a file, at its top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffusion."):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("diffusion.")]
    return found


def test_every_module_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert parts - {"__init__"} == set().union(*LAYERS)


def test_no_import_points_up():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "diffusion." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module.endswith("__init__") or module.count(".") == 0:
            continue
        for line, target in imports(path):
            if layer_of(target) > layer_of(module):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)
