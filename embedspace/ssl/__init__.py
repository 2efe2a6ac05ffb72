"""Self-supervised image methods as tasks (`task.py`: VICReg, SimCLR, Barlow Twins) and their
evaluation (`evaluate.py`: kNN, probe, retrieval, OOD and geometry beside the baselines)."""
