"""Experiment configs: plain ml_collections, one file per method; each runs from any directory."""
