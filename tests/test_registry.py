"""Registries: explicit entries, duplicates refused, unknown names listed, and no import cycles in the package."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.errors import ConfigError, ModelError
from analysis.models.adapters import FAMILIES, FamilyAdapter, adapter_class, register_adapter
from analysis.registry import Registry

PACKAGE = Path(__file__).resolve().parent.parent / "analysis"


def test_a_duplicate_name_is_an_error() -> None:
    """Registering a name twice, or a built-in one, fails instead of silently replacing it."""
    registry: Registry[int] = Registry("number", {"one": "math:pi"}, hint="register it")
    registry.register("two", 2)
    with pytest.raises(ConfigError, match="number 'two' is already registered"):
        registry.register("two", 3)
    with pytest.raises(ConfigError, match="number 'one' is already registered"):
        registry.register("one", 1)
    assert registry.get("two") == 2 and registry.names() == ["one", "two"]

    class AnotherLlava(FamilyAdapter):
        model_type = "llava"

    with pytest.raises(ModelError, match="'llava' is already registered"):
        register_adapter(AnotherLlava)
    assert adapter_class("llava").__name__ == "LlavaAdapter"


def test_an_unknown_family_lists_the_registered_ones() -> None:
    """The error names every registered model_type and how to add one."""
    with pytest.raises(ModelError) as error:
        adapter_class("mllama")
    message = str(error.value)
    for name in FAMILIES.names():
        assert name in message
    assert "register_adapter" in message


def test_built_in_families_load_lazily() -> None:
    """Importing the adapter base imports no family module; looking a family up does."""
    code = (
        "import sys, analysis.models.adapters as a; "
        "assert 'analysis.models.llava' not in sys.modules; a.adapter_class('llava'); "
        "assert 'analysis.models.llava' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _module_imports(path: Path) -> set[str]:
    """The analysis modules a file imports anywhere in it (deferred imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("analysis"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("analysis"))
    return names


def test_the_package_has_no_import_cycles() -> None:
    """The import graph of analysis/ is acyclic, deferred imports included (adapters no longer import the family
    modules that import them)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {
        name: {target for target in _module_imports(path) if target in modules and target != name}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = trail[trail.index(name) :] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        state[name] = 1
        for target in sorted(graph[name]):
            visit(target, [*trail, name])
        state[name] = 2

    for name in sorted(graph):
        visit(name, [])


# Hugging Face submodule names of a decoder layer: only the family adapters may spell them.
HF_MODULE_NAMES = ("self_attn", "q_proj", "k_proj", "v_proj", "o_proj")
# Hugging Face call arguments, config internals and output fields: only analysis/models/ may spell them.
HF_ARGUMENT_NAMES = (
    "_attn_implementation",
    "layer_idx",
    "inputs_embeds",
    "logits_to_keep",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "past_key_values",
    "cache_position",
    "position_ids",
    "pixel_values",
    "image_grid_thw",
    "last_hidden_state",
    "attentions",
)
# The organism builds and trains Hugging Face models from scratch (a model zoo, like analysis/models/); the rule
# is that the analysis (tracing, probes, pruning, stages) never depends on how transformers spells things.
MODEL_BUILDERS = ("models", "organism")


def _lines_outside(pattern: re.Pattern[str], folders: tuple[str, ...]) -> list[str]:
    """Every line of analysis/ outside the given subpackages that matches ``pattern``."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if any(path.is_relative_to(PACKAGE / folder) for folder in folders):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    return found


def test_hf_module_names_stay_in_the_adapters() -> None:
    """Code outside analysis/models/ reaches a layer's parts through the adapter, never by HF attribute name."""
    found = _lines_outside(re.compile(r"\.(" + "|".join(HF_MODULE_NAMES) + r")\b"), ("models",))
    assert not found, "\n".join(found)


def test_hf_argument_names_stay_in_the_models_package() -> None:
    """Outside analysis/models/ no HF argument, config internal or output field is spelled (keyword, key, attribute)."""
    names = "|".join(HF_ARGUMENT_NAMES)
    found = _lines_outside(re.compile(rf"\b({names})=|[\"']({names})[\"']|\.({names})\b"), MODEL_BUILDERS)
    assert not found, "\n".join(found)
