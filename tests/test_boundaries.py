"""The architecture's rules, checked on the source: the trainer never imports the nodes or
ComfyUI, family knowledge lives with the families (and the one ComfyUI conversion registry), and
every module parses and imports on the oldest Python the package promises."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from lora_lab.trainer.config import tomllib
from lora_lab.trainer.families import FAMILY_NAMES

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("trainer", "nodes") for p in (REPO / folder).rglob("*.py"))
COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "execution",
                 "nodes")
# Where family names may be written: the families themselves and the ComfyUI conversion registry.
FAMILY_HOMES = (REPO / "trainer" / "families", REPO / "nodes" / "graph_model.py")


def imports(path: Path) -> list[tuple[str, int]]:
    """(module, level) of every import in a file; level > 0 for relative imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_trainer_never_imports_the_nodes_or_comfyui():
    offending = []
    for path in (p for p in SOURCES if "trainer" in p.relative_to(REPO).parts[:1]):
        depth = len(path.relative_to(REPO / "trainer").parts)  # relative levels that stay inside trainer/
        for module, level in imports(path):
            top = module.split(".")[0]
            if (level == 0 and top in COMFY_MODULES) or level > depth or (level == depth and top == "nodes"):
                offending.append(f"{path.relative_to(REPO)}: {'.' * level}{module}")
    assert not offending, offending


def test_only_comfy_bridge_imports_comfyui():
    offending = [f"{path.relative_to(REPO)}: {module}" for path in SOURCES if path.name != "comfy_bridge.py"
                 for module, level in imports(path) if level == 0 and module.split(".")[0] in COMFY_MODULES]
    assert not offending, offending


def test_no_family_name_outside_the_families_and_the_conversion_registry():
    """Adding a family must not mean editing the loop, the config or the nodes."""
    offending = []
    for path in SOURCES:
        if any(path == home or home in path.parents for home in FAMILY_HOMES):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in FAMILY_NAMES:
                offending.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not offending, offending


def oldest_python() -> tuple[int, int]:
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec).groups()
    return int(major), int(minor)


# Standard-library names that are newer than 3.10, with the version that added them.
NEWER_STDLIB = {"tomllib": (3, 11), "datetime.UTC": (3, 11), "enum.StrEnum": (3, 11), "typing.Self": (3, 11),
                "typing.Never": (3, 11), "typing.LiteralString": (3, 11), "typing.assert_never": (3, 11),
                "asyncio.TaskGroup": (3, 11), "asyncio.timeout": (3, 11), "typing.override": (3, 12),
                "itertools.batched": (3, 12), "warnings.deprecated": (3, 13)}


def test_every_module_parses_and_imports_on_the_oldest_promised_python():
    oldest = oldest_python()
    problems = []
    for path in [*SOURCES, REPO / "__init__.py", REPO / "__main__.py"]:
        source = path.read_text()
        try:
            tree = ast.parse(source, str(path), feature_version=oldest)
        except SyntaxError as error:
            problems.append(f"{path.relative_to(REPO)}: {error}")
            continue
        guarded = {statement.lineno for block in ast.walk(tree) if isinstance(block, ast.Try)
                   and any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                           for h in block.handlers) for statement in block.body}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for name in names:
                added = NEWER_STDLIB.get(name)
                if added and added > oldest and node.lineno not in guarded:
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno}: {name} needs Python "
                                    f"{added[0]}.{added[1]}")
    assert not problems, problems


def test_python_310_gets_tomli():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("tomli") and "python_version < '3.11'" in d for d in dependencies)
