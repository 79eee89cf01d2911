"""VisiPruner: pruning configs derived from stage analysis, FLOPs accounting, and the pruned runtime."""
