"""The instrumentation layer under tracing, probes and pruning: routed attention with context-owned state."""

from analysis.hooks.attention import (
    AttentionCall,
    AttentionHooks,
    AttentionRoute,
    LastRowObservation,
    RegionMasks,
    ZeroedEdges,
    route_attention,
)

__all__ = [
    "AttentionCall",
    "AttentionHooks",
    "AttentionRoute",
    "LastRowObservation",
    "RegionMasks",
    "ZeroedEdges",
    "route_attention",
]
