"""Pruning configs: ours (typed, with provenance) and the VisiPruner authors' ``--pruning-config`` JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from analysis.errors import ConfigError
from analysis.pruner.methods import METHODS, method_for
from analysis.pruner.methods.random_tokens import RandomConfig
from analysis.pruner.methods.visipruner import (
    AUTHORS_DEEP_COSINE,
    AUTHORS_DEEP_PATIENCE,
    LAYER0_RULES,
    STAGES,
    VisiPrunerConfig,
)

# The built-in methods' defaults, stated once in their typed configs (FastV's K and budget are random's too).
_VISIPRUNER = VisiPrunerConfig()
_ONE_SHOT = RandomConfig()

# LLaVA-1.5's decoders (Vicuna-7B and -13B): the shapes the authors' two layer-0 rules were written for.
AUTHORS_ARCHITECTURES = {(32, 4096, 32, 11008): "authors_7b", (40, 5120, 40, 13824): "authors_13b"}
# How a pruned model runs: tokens dropped from hidden states and KV cache, or hidden by attention masks.
PRUNING_RUNTIMES = ("drop", "mask", "latency")


@dataclass
class PruningConfig:
    """How to prune image tokens, for one model depth; ``provenance`` says how it was chosen.

    This is the file format. The method (``analysis.pruner.methods``) reads its typed parameters from it by name:
    the built-in methods' parameters are the top-level fields below (as every config file written so far holds
    them); a method registered later keeps its own under ``options``, so adding one changes nothing here.
    """

    method: str = "visipruner"
    num_layers: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    shallow_mid_layer: int = _VISIPRUNER.shallow_mid_layer
    layer_threshold: float = _VISIPRUNER.layer_threshold
    tokens_threshold: float = _VISIPRUNER.tokens_threshold
    deep_cosine: float = _VISIPRUNER.deep_cosine
    deep_patience: int = _VISIPRUNER.deep_patience
    shallow_in_decode: bool = _VISIPRUNER.shallow_in_decode
    shallow_rule: str = _VISIPRUNER.shallow_rule
    layer0_rule: str = _VISIPRUNER.layer0_rule
    rule_precision: str = _VISIPRUNER.rule_precision
    rule: str = _VISIPRUNER.rule
    prune_layer: int = _ONE_SHOT.prune_layer
    keep_tokens: int = _ONE_SHOT.keep_tokens
    seed: int = _ONE_SHOT.seed
    options: dict[str, Any] = field(default_factory=dict)  # parameters of methods without a field above
    provenance: dict[str, Any] = field(default_factory=dict)

    def validate(self, num_layers: int | None = None) -> None:
        """Collect every problem and raise them together, before any model runs."""
        problems = []
        if num_layers is not None and self.num_layers != num_layers:
            problems.append(f"config is for a {self.num_layers}-layer model but this model has {num_layers} layers")
        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r} (choose from {', '.join(METHODS.names())})")
        else:
            known = METHODS.get(self.method).config_type.parameter_names()
            unknown = sorted(set(self.options) - set(known))
            if unknown:
                problems.append(f"unknown options {unknown} for {self.method} (its parameters: {known})")
            else:
                problems += method_for(self).problems(num_layers if num_layers is not None else self.num_layers)
        if problems:
            raise ConfigError("invalid pruning config: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return asdict(self)

    def with_authors_rule(self, layer0_rule: str = "none") -> PruningConfig:
        """The same thresholds under the authors' rule: shallow weights zeroed in the prefill only, their layer-0 rule,
        the selection in the model's dtype with their formulas, their deep constants and keep-everything behaviour."""
        return replace(
            self,
            rule="authors",
            shallow_rule="zero",
            shallow_in_decode=False,
            rule_precision="model",
            layer0_rule=layer0_rule,
            deep_cosine=AUTHORS_DEEP_COSINE,
            deep_patience=AUTHORS_DEEP_PATIENCE,
        )

    def authors_json(self) -> dict[str, Any]:
        """The authors' ``--pruning-config`` JSON of a config their validation accepts (see ``authors_equivalent``)."""
        if self.method != "visipruner":
            raise ConfigError(f"the authors' code runs VisiPruner only, not {self.method!r}")
        return {
            "mode": list(self.stages),
            "shallow_mid_layer": self.shallow_mid_layer,
            "layer_threshold": float(self.layer_threshold),
            "tokens_threshold": float(self.tokens_threshold),
        }


# The largest float below 1 and the smallest above 0: their validation wants thresholds strictly inside (0, 1), and
# these round to 1 and 0 in float32 and float16, where the rule compares, so they decide exactly as 1 and 0 do.
_BELOW_ONE = math.nextafter(1.0, 0.0)
_ABOVE_ZERO = math.ulp(0.0)


def authors_equivalent(config: PruningConfig, layer0_rule: str = "none") -> tuple[PruningConfig, list[str]]:
    """The authors'-mode config closest to ``config`` that their validation accepts, and what differs from it.

    Raises a ConfigError where no valid config comes close (a token threshold >= 1, which is an absolute norm
    there too, or a deep stage without the middle one).
    """
    if config.method != "visipruner":
        raise ConfigError(f"the authors' format holds VisiPruner configs only, not {config.method!r}")
    stages, differences = list(config.stages), []
    shallow_mid_layer, layer_threshold, tokens_threshold = (
        config.shallow_mid_layer,
        config.layer_threshold,
        config.tokens_threshold,
    )
    if "deep" in stages and "middle" not in stages:
        raise ConfigError(
            "a deep stage without the middle one cannot be expressed in the authors' format (their code "
            "exits only after a selection)"
        )
    if shallow_mid_layer == 0 and "shallow" in stages:
        stages.remove("shallow")
        differences.append(
            "mode drops 'shallow': with shallow_mid_layer 0 our shallow stage is empty, and their "
            "shallow_mid_layer must be >= 1"
        )
    if shallow_mid_layer == 0 and "middle" in stages:
        shallow_mid_layer = 1
        differences.append(
            "shallow_mid_layer 0 -> 1 (their minimum): the selection rule can first fire at layer 2, not at layer 1"
        )
    if {"middle", "deep"} & set(stages):
        if tokens_threshold >= 1:
            raise ConfigError(
                f"tokens_threshold {tokens_threshold} is an absolute norm >= 1, which the authors' "
                "validation refuses (it wants (0, 1)); no config in their format keeps the same tokens"
            )
        if layer_threshold >= 1:
            layer_threshold = _BELOW_ONE
            differences.append(
                f"layer_threshold {config.layer_threshold} -> {_BELOW_ONE!r} (equivalent: rounds to 1 "
                "in float32 and float16)"
            )
        if tokens_threshold <= 0:
            tokens_threshold = _ABOVE_ZERO
            differences.append(
                f"tokens_threshold {config.tokens_threshold} -> {_ABOVE_ZERO!r} (equivalent: rounds to "
                "0 in float32 and float16)"
            )
    for name, value in (("deep_cosine", AUTHORS_DEEP_COSINE), ("deep_patience", AUTHORS_DEEP_PATIENCE)):
        if "deep" in stages and getattr(config, name) != value:
            differences.append(f"{name} {getattr(config, name)} -> {value} (fixed in their code)")
    theirs = replace(
        config,
        stages=stages,
        shallow_mid_layer=shallow_mid_layer,
        layer_threshold=layer_threshold,
        tokens_threshold=tokens_threshold,
        provenance={},
    ).with_authors_rule(layer0_rule if "shallow" in stages else "none")
    theirs.validate()
    return theirs, differences


def authors_layer0_rule(model_type: str, text_config: Any) -> str | None:
    """The authors' layer-0 rule for a LLaVA-1.5-7B or -13B architecture (their code picks it from the checkpoint's
    path name); None for any other model."""
    if model_type != "llava":
        return None
    layers, hidden, heads, intermediate = (
        int(getattr(text_config, name, 0) or 0)
        for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    )
    return AUTHORS_ARCHITECTURES.get((layers, hidden, heads, intermediate))


_AUTHORS_KEYS = {"mode", "shallow_mid_layer", "layer_threshold", "tokens_threshold", "mid_deep_layer"}


def _authors_type_problems(values: dict[str, Any]) -> list[str]:
    """Their validation's type checks on the raw JSON (an integer threshold such as 1 is refused there)."""
    problems = []
    if not isinstance(values.get("mode"), list):
        problems.append("'mode' must be a list of strings")
    if "shallow_mid_layer" in values and (
        not isinstance(values["shallow_mid_layer"], int) or isinstance(values["shallow_mid_layer"], bool)
    ):
        problems.append("their shallow_mid_layer must be an integer")
    for name in ("layer_threshold", "tokens_threshold"):
        if name in values and not isinstance(values[name], float):
            problems.append(f"their {name} must be a JSON float (written with a decimal point)")
    return problems


def parse_config(
    values: dict[str, Any], num_layers: int | None = None, *, layer0_rule: str | None = None
) -> PruningConfig:
    """Our config or the authors' JSON (recognised by its ``mode`` key), validated; all problems reported at once.

    An authors' JSON with the shallow stage runs one of their layer-0 rules, which their format does not name:
    ``layer0_rule`` gives it (``config_for_model`` picks it from a LLaVA-1.5 architecture).
    """
    problems: list[str] = []
    defaults = PruningConfig()
    if "mode" in values:
        unknown = sorted(set(values) - _AUTHORS_KEYS)
        missing = sorted({"mode", "shallow_mid_layer", "layer_threshold", "tokens_threshold"} - set(values))
        problems += [f"unknown keys {unknown}"] * bool(unknown) + [f"missing keys {missing}"] * bool(missing)
        problems += _authors_type_problems(values)
        mode = values["mode"]
        stages = list(mode) if isinstance(mode, list) else [str(mode)]
        if "shallow" in stages and layer0_rule is None:
            problems.append(
                "an authors' JSON with the shallow stage runs one of their layer-0 rules: LLaVA-1.5-7B and "
                "-13B get theirs from the architecture; for another model choose --authors-layer0 "
                f"({', '.join(LAYER0_RULES)})"
            )
        config = PruningConfig(
            method="visipruner",
            num_layers=num_layers or 0,
            stages=stages,
            shallow_mid_layer=int(values.get("shallow_mid_layer", defaults.shallow_mid_layer)),
            layer_threshold=float(values.get("layer_threshold", defaults.layer_threshold)),
            tokens_threshold=float(values.get("tokens_threshold", defaults.tokens_threshold)),
            provenance={"source": "authors' --pruning-config JSON"},
        ).with_authors_rule(layer0_rule if "shallow" in stages and layer0_rule is not None else "none")
    else:
        known = {f.name for f in fields(PruningConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            problems.append(f"unknown keys {unknown} (known: {sorted(known)})")
        if "num_layers" not in values:
            problems.append("missing key num_layers (the model depth the config was made for)")
        config = PruningConfig(**{key: value for key, value in values.items() if key in known})
    try:
        config.validate(num_layers)
    except ConfigError as error:
        problems.append(str(error).removeprefix("invalid pruning config: "))
    if problems:
        raise ConfigError("invalid pruning config: " + "; ".join(problems))
    return config


def read_config_values(path: str | Path) -> dict[str, Any]:
    """The JSON object of a pruning config file, unvalidated."""
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"pruning config {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"pruning config {path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"pruning config {path} must hold a JSON object")
    return values


def load_config(path: str | Path, num_layers: int | None = None, *, layer0_rule: str | None = None) -> PruningConfig:
    """Read and validate a pruning config file (``layer0_rule`` as in ``parse_config``)."""
    return parse_config(read_config_values(path), num_layers, layer0_rule=layer0_rule)


def config_for_model(
    path: str | Path, model_type: str, text_config: Any, layer0_rule: str | None = None
) -> PruningConfig:
    """A pruning config for a loaded model, its depth checked; an authors' JSON runs their layer-0 rule for a
    LLaVA-1.5-7B or -13B architecture unless ``layer0_rule`` names one ("auto" or None: from the architecture), and
    its provenance says which ran and why."""
    given = layer0_rule not in (None, "auto")
    chosen = layer0_rule if given else authors_layer0_rule(model_type, text_config)
    config = load_config(path, int(text_config.num_hidden_layers), layer0_rule=chosen)
    if config.rule == "authors" and "shallow" in config.stages:
        reason = "given" if given else "from the LLaVA-1.5 architecture"
        config.provenance = {**config.provenance, "layer0_rule": f"{config.layer0_rule} ({reason})"}
    return config
