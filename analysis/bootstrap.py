"""Percentile bootstrap intervals of means, shared by the figures and the pruning tables."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values: np.ndarray, n_boot: int, confidence: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of each column's mean, resampling rows (samples); NaNs are skipped."""
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    n = len(values)
    if n < 2 or n_boot < 1:
        mean = np.nanmean(values, axis=0) if n else np.full(values.shape[1], np.nan)
        return mean, mean
    # Resampling rows with replacement is a multinomial draw of how often each row is picked, which
    # turns every bootstrap mean into one matrix product instead of a copy of the data per draw.
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=n_boot).astype(float)
    present = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (counts @ np.where(present, values, 0.0)) / (counts @ present)
    alpha = (1 - confidence) / 2
    return np.nanquantile(means, alpha, axis=0), np.nanquantile(means, 1 - alpha, axis=0)
