"""Dataset layer: benchmark and local loaders yielding ``Sample`` records, and answer scoring."""

from analysis.data.loaders import DEFAULT_DATASET, list_datasets, load_samples
from analysis.data.samples import IMAGE_PLACEHOLDER, Sample
from analysis.data.scoring import is_correct

__all__ = ["DEFAULT_DATASET", "IMAGE_PLACEHOLDER", "Sample", "is_correct", "list_datasets", "load_samples"]
