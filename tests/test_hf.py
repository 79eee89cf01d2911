"""The one place that knows transformers' call conventions: cache arguments by type, version range, messages."""

from __future__ import annotations

import re

import pytest
import torch

from analysis.models import hf


def test_the_cache_is_found_by_type_under_any_name() -> None:
    """Under its current name, its old name, or a name a future release might pick."""
    cache = hf.new_cache()
    for name in ("cache", "past_key_values", "kv_state"):
        assert hf.call_cache({"input_ids": torch.zeros(1, 2), name: cache}) is cache
    assert hf.call_cache({"past_key_values": None, "use_cache": True}) is None


def test_two_caches_in_one_call_are_a_compatibility_error() -> None:
    """The runtime cannot tell which one holds the text model's keys and values."""
    with pytest.raises(hf.CompatibilityError, match="2 KV caches"):
        hf.call_cache({"a": hf.new_cache(), "b": hf.new_cache()})


def test_cache_kwargs_use_the_name_the_installed_forward_takes() -> None:
    """``cache=`` where the model's forward takes it (transformers >= 5.24), else ``past_key_values=``."""
    import inspect

    from analysis.models.registry import load_model

    loaded = load_model("tiny-llava")
    for module in (loaded.model, loaded.adapter.language_model()):
        (name,) = set(hf.cache_kwargs(module, None)) - {"use_cache"}
        assert name in inspect.signature(type(module).forward).parameters


def test_the_supported_range_is_the_declared_one_and_closed() -> None:
    """The range in messages is pyproject's (installed metadata), with an upper bound that admits no untested minor."""
    declared = hf.supported_transformers()
    assert re.fullmatch(
        r">=\d+\.\d+(\.\d+)?,\s*<=\d+\.\d+\.\d+|<=\d+\.\d+\.\d+,\s*>=\d+\.\d+(\.\d+)?", declared.replace(" ", "")
    ), declared
    message = str(hf.compatibility_error("something moved"))
    assert hf.installed_transformers() in message and declared in message and "not a problem with your input" in message


def test_the_installed_transformers_is_in_the_declared_range() -> None:
    """The suite runs only on releases the project declares (CI installs the range's ends)."""
    from packaging.specifiers import SpecifierSet

    assert hf.installed_transformers() in SpecifierSet(hf.supported_transformers())


def test_an_untested_release_is_named_at_the_start_of_every_command(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A transformers outside the declared range gets one warning line naming it, the range and the fix."""
    from analysis import __main__ as toolkit_main

    assert hf.untested_release() is None
    monkeypatch.setattr(hf, "installed_transformers", lambda: "5.99.0")
    warning = hf.untested_release()
    assert warning is not None and "5.99.0" in warning and hf.supported_transformers() in warning
    assert toolkit_main.main(["--list-datasets"]) == 0
    assert [r.message for r in caplog.records if "outside the range" in r.message] == [warning]
