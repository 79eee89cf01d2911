"""The built-in probes, one per file (registered in ``analysis.probes.base.PROBE_KINDS``)."""
