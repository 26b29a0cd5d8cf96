"""Experiment management above the engine: presets (recipes as deltas on one base), sweeps of presets x seeds
(child `run.py` processes), and the summary of their run folders. Torch-free."""
