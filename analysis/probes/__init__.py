"""Causal probes: attention interventions, logit lens and contribution probes."""
