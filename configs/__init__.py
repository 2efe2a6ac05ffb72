"""Experiment configs: plain ml_collections, one file per method, run from the repository root."""
