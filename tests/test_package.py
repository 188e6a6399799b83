"""The package as a whole: import layers (docs/architecture.md), lazy heavy imports, function size."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_freqcompress"
GROUPED = ("methods", "training")
"""Packages that are one line of the layer list each."""


def _layers() -> dict[str, int]:
    """Module (or grouped package) -> its line in docs/architecture.md's "Import layers" list."""
    section = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").split("## Import layers")[1]
    lines = re.findall(r"^(\d+)\. (.+)$", section.split("\n## ")[0], re.M)
    return {name.strip(): int(number) for number, names in lines for name in names.split(",")}


def _unit(module: str) -> str:
    """The layer-list name of a dotted module: grouped packages stand for all their modules."""
    parts = module.split(".")
    if module == "hf_freqcompress":
        return module
    return parts[1] if parts[1] in GROUPED else ".".join(parts[1:])


def _module_level_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level (function-level imports are deliberate and lazy)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        dotted = ".".join(path.with_suffix("").relative_to(ROOT).parts).removesuffix(".__init__")
        package = dotted if path.name == "__init__.py" else dotted.rpartition(".")[0]
        targets = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                if node.module:
                    targets.add(".".join([*base, node.module]))
                else:
                    targets.update(".".join([*base, alias.name]) for alias in node.names)
        found[dotted] = targets
    return found


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    layers = _layers()
    imports = _module_level_imports()
    assert {_unit(m) for m in imports} <= set(layers), "modules missing from docs/architecture.md's layer list"
    upward = [
        f"{module} (layer {layers[_unit(module)]}) imports {target} (layer {layers[_unit(target)]})"
        for module, targets in imports.items() for target in targets
        if _unit(target) in layers and layers[_unit(target)] > layers[_unit(module)]
    ]
    assert not upward


def test_import_is_light_and_loads_saving_on_first_use():
    code = (
        "import sys, hf_freqcompress;"
        "heavy = ('timm', 'transformers', 'accelerate', 'huggingface_hub', 'safetensors');"
        "print([m for m in heavy if m in sys.modules]);"
        "hf_freqcompress.save_pretrained;"
        "print('huggingface_hub' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"


def test_no_function_is_longer_than_sixty_lines_of_code():
    """Docstrings are not counted: the public entry points document their arguments at length."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node, clean=False)
                doc_lines = docstring.count("\n") + 1 if docstring else 0
                if node.end_lineno - node.lineno + 1 - doc_lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long
