"""Ablation study configs for `flaxlm sweep`."""
