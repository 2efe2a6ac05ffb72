"""Measuring any `[n, d]` space: kNN and linear probes, retrieval under every measure, OOD
detection, the hypersphere report and its plots. Knows nothing of models or methods."""

NONFINITE_FIX = ("the model gives NaN or inf on real inputs (it diverged, or its activations "
                 "overflow), so no measure of it means anything: evaluate an earlier checkpoint, "
                 "or retrain with a lower config.optimizer.base_lr")
"""What an evaluation says after `geometry.require_finite` refuses a model's embeddings."""
