"""VisiPruner's contribution probe: what each image token adds to the last prompt row's attention output, per
layer (the quantity its selection rule thresholds)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from analysis.probes.base import Probe, ProbeBatch
from analysis.results import table_schema

CONTRIBUTIONS_SCHEMA = table_schema(
    [
        ("sample_id", pa.string()),
        ("layer", pa.int16()),
        ("image_index", pa.int16()),
        ("token_index", pa.int32()),
        ("position", pa.int32()),
        ("attention", pa.float32()),
        ("cosine_without", pa.float32()),
        ("norm", pa.float32()),
    ],
    "VisiPruner's contribution probe at the last prompt position: c_j = concat_h(a[t,j] v_h[j]) before o_proj; "
    "cosine_without = cos(o - c_j, o), norm = ||c_j||_2, attention = head-mean a[t,j]; float32.",
)


class ContributionProbe(Probe):
    """Every image token at every layer, from the clean pass's observations."""

    name = "contribution"
    tables = {"contributions": CONTRIBUTIONS_SCHEMA}
    description = "each image token's contribution to the last row's attention output"

    def rows(self, batch: ProbeBatch) -> dict[str, pa.Table]:
        """Contribution rows: every image token at every layer."""
        columns: dict[str, list[np.ndarray]] = {name: [] for name in CONTRIBUTIONS_SCHEMA.names}
        for row, (sample, layout) in enumerate(zip(batch.samples, batch.inputs.layouts, strict=True)):
            n = layout.n_image_tokens
            image_index, token_index = layout.image_token_coordinates
            for layer, record in sorted(batch.observer.records.items()):
                columns["sample_id"].append(np.full(n, sample.sample_id, dtype=object))
                columns["layer"].append(np.full(n, layer))
                columns["image_index"].append(image_index)
                columns["token_index"].append(token_index)
                columns["position"].append(layout.image_positions)
                for name in ("attention", "norm"):
                    columns[name].append(record[name][row, :n].cpu().numpy())
                columns["cosine_without"].append(record["cosine"][row, :n].cpu().numpy())
        table = pa.table({name: np.concatenate(parts) for name, parts in columns.items()}, schema=CONTRIBUTIONS_SCHEMA)
        return {"contributions": table}
