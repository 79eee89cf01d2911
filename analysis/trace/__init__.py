"""Attention tracing: hooks that reduce attention per layer and a run writer."""
