"""Model registry, loading and per-family adapters."""
