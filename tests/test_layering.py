"""Imports go one way: each module of ``custom`` imports only modules of its own layer or the layers below
(bundle/docs/README.md, "Layering"). Checked on the source with ``ast``, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CUSTOM = REPO / "custom"

#: module prefix -> layer (longest prefix wins); higher layers may import lower ones, never the reverse
LAYERS = {
    "custom": 0, "custom.errors": 0, "custom.io": 0, "custom.checkpoints": 0,
    "custom.dicom": 1,
    "custom.transforms": 2, "custom.features": 2,
    "custom.data": 3,
    "custom.networks": 4, "custom.metrics": 4, "custom.losses": 4,
    "custom.engines": 5,
    "custom.workflows": 6, "custom.bench": 6, "custom.label_app": 6, "custom.gpu_check": 6, "custom.serving": 6,
}


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(module)


def module_name(path: Path, root: Path = REPO) -> str:
    name = ".".join(path.relative_to(root).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def custom_imports(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a ``custom`` module in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "custom"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "custom":
                found.append((node.lineno, mod))
    return found


def test_layer_of_known_modules():
    assert layer("custom.engines.sampling") == 5 and layer("custom.data.prepare") == 3 and layer("custom") == 0
    assert layer("custom.workflows.bundle") > layer("custom.engines.diffusion") > layer("custom.networks.gcdm")
    assert layer("custom.dicom") < layer("custom.transforms.intensity") < layer("custom.data.conditions")


def test_imports_go_down_the_layers_only():
    app = CUSTOM / "label_app"  # runs in its own environment and never imports the product code
    upward = []
    for path in sorted(CUSTOM.rglob("*.py")):
        if app in path.parents:
            continue
        me = module_name(path)
        for line, mod in custom_imports(path):
            if layer(mod) > layer(me):
                upward.append(f"{path.relative_to(REPO)}:{line}: {me} (layer {layer(me)}) imports {mod} (layer {layer(mod)})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_upward_imports_in_functions_and_relative_form(tmp_path):
    probe = tmp_path / "custom" / "transforms" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("import numpy\nfrom custom.errors import MammoInputError\n\n\ndef f():\n"
                     "    from custom.engines.diffusion import LatentCache\n    from ..networks import gcdm\n")
    found = custom_imports(probe, tmp_path)
    assert found == [(2, "custom.errors"), (6, "custom.engines.diffusion"), (7, "custom.networks")]
    me = module_name(probe, tmp_path)
    assert [m for _, m in found if layer(m) > layer(me)] == ["custom.engines.diffusion", "custom.networks"]
