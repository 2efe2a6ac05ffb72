"""Measuring any `[n, d]` space: kNN and linear probes, retrieval under every measure, OOD
detection, the hypersphere report and its plots. Knows nothing of models or methods."""
