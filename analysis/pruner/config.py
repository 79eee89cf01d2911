"""Pruning configs: ours (typed, with provenance) and the VisiPruner authors' ``--pruning-config`` JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from analysis.errors import ConfigError

METHODS = ("visipruner", "fastv", "random", "pre_llm", "none")
STAGES = ("shallow", "middle", "deep")
# How the shallow stage removes text->image attention. "mask": hidden before the softmax, so the text's attention
# renormalises over the remaining keys (ours). "zero": weights zeroed after the softmax without renormalising, as
# the authors' code does; the removed mass is lost, or, with ``layer0_rule`` "first_image", moved in layer 0 onto
# the sample's first image token (their LLaVA-1.5-7B rule).
SHALLOW_RULES = ("mask", "zero")
LAYER0_RULES = ("none", "first_image")
# Precision of the selection rule's contributions and cosines: float32 (ours), or the model's dtype as in the
# authors' code, where 0.999 is 2 ulp from 1 in fp16.
RULE_PRECISIONS = ("float32", "model")
# How a pruned model runs: tokens dropped from hidden states and KV cache, or hidden by attention masks.
PRUNING_RUNTIMES = ("drop", "mask")


@dataclass
class PruningConfig:
    """How to prune image tokens, for one model depth; ``provenance`` says how it was chosen."""

    method: str = "visipruner"
    num_layers: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    shallow_mid_layer: int = 6
    layer_threshold: float = 0.995
    tokens_threshold: float = 0.2
    deep_cosine: float = 0.999
    deep_patience: int = 2
    shallow_in_decode: bool = True
    shallow_rule: str = "mask"
    layer0_rule: str = "none"
    rule_precision: str = "float32"
    prune_layer: int = 2
    keep_tokens: int = 64
    seed: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)

    def validate(self, num_layers: int | None = None) -> None:
        """Collect every problem and raise them together, before any model runs."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        unknown_stages = [s for s in self.stages if s not in STAGES]
        if unknown_stages:
            problems.append(f"unknown mode(s) {unknown_stages} (choose from {', '.join(STAGES)})")
        if num_layers is not None and self.num_layers != num_layers:
            problems.append(f"config is for a {self.num_layers}-layer model but this model has {num_layers} layers")
        depth = num_layers if num_layers is not None else self.num_layers
        if depth and self.method == "visipruner" and not 0 <= self.shallow_mid_layer < depth:
            problems.append(f"shallow_mid_layer {self.shallow_mid_layer} outside 0..{depth - 1}")
        if depth and self.method in ("fastv", "random") and not 1 <= self.prune_layer < depth:
            problems.append(f"prune_layer {self.prune_layer} outside 1..{depth - 1}")
        if not 0 < self.layer_threshold <= 1:
            problems.append(f"layer_threshold {self.layer_threshold} outside (0, 1]")
        if not 0 < self.deep_cosine <= 1:
            problems.append(f"deep_cosine {self.deep_cosine} outside (0, 1]")
        for name, value, allowed in (("shallow_rule", self.shallow_rule, SHALLOW_RULES),
                                     ("layer0_rule", self.layer0_rule, LAYER0_RULES),
                                     ("rule_precision", self.rule_precision, RULE_PRECISIONS)):
            if value not in allowed:
                problems.append(f"unknown {name} {value!r} (choose from {', '.join(allowed)})")
        if self.layer0_rule != "none" and self.shallow_rule != "zero":
            problems.append(f"layer0_rule {self.layer0_rule!r} moves zeroed attention mass, so it needs "
                            "shallow_rule 'zero'")
        if self.tokens_threshold < 0:
            problems.append(f"tokens_threshold {self.tokens_threshold} must be >= 0 (an absolute norm)")
        if self.deep_patience < 1 or self.keep_tokens < 0:
            problems.append("deep_patience must be >= 1 and keep_tokens >= 0")
        if problems:
            raise ConfigError("invalid pruning config: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return asdict(self)

    def with_authors_rule(self, layer0_rule: str = "none") -> PruningConfig:
        """The same thresholds under the authors' rule: shallow weights zeroed in the prefill only, rule in the model dtype."""
        return replace(self, shallow_rule="zero", shallow_in_decode=False, rule_precision="model",
                       layer0_rule=layer0_rule)

    def authors_json(self) -> dict[str, Any]:
        """The authors' ``--pruning-config`` JSON (their code reads only these keys)."""
        if self.method != "visipruner":
            raise ConfigError(f"the authors' code runs VisiPruner only, not {self.method!r}")
        return {"mode": list(self.stages), "shallow_mid_layer": self.shallow_mid_layer,
                "layer_threshold": self.layer_threshold, "tokens_threshold": self.tokens_threshold}


_AUTHORS_KEYS = {"mode", "shallow_mid_layer", "layer_threshold", "tokens_threshold", "mid_deep_layer"}


def parse_config(values: dict[str, Any], num_layers: int | None = None) -> PruningConfig:
    """Our config or the authors' JSON (recognised by its ``mode`` key), validated; all problems reported at once."""
    problems: list[str] = []
    defaults = PruningConfig()
    if "mode" in values:
        unknown = sorted(set(values) - _AUTHORS_KEYS)
        missing = sorted({"mode", "shallow_mid_layer", "layer_threshold", "tokens_threshold"} - set(values))
        problems += [f"unknown keys {unknown}"] * bool(unknown) + [f"missing keys {missing}"] * bool(missing)
        mode = values["mode"]
        config = PruningConfig(
            method="visipruner", num_layers=num_layers or 0,
            stages=list(mode) if isinstance(mode, list) else [str(mode)],
            shallow_mid_layer=int(values.get("shallow_mid_layer", defaults.shallow_mid_layer)),
            layer_threshold=float(values.get("layer_threshold", defaults.layer_threshold)),
            tokens_threshold=float(values.get("tokens_threshold", defaults.tokens_threshold)),
            provenance={"source": "authors' --pruning-config JSON"},
        ).with_authors_rule()  # their layer-0 handling depends on the checkpoint, so it stays an explicit option
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


def load_config(path: str | Path, num_layers: int | None = None) -> PruningConfig:
    """Read and validate a pruning config file."""
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"pruning config {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"pruning config {path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"pruning config {path} must hold a JSON object")
    return parse_config(values, num_layers)
