"""The training methods, listed once: the flags, the datasets, the models and the checkpoint checks read them.

gaze_sup trains on gaze pseudo-masks, sparse_sup on sparse label maps (both one network per level, with the
cross-level consistency term), full_sup on the ground-truth masks (one network)."""
METHODS = ("gaze_sup", "sparse_sup", "full_sup")
MULTI_LEVEL_METHODS = ("gaze_sup", "sparse_sup")  # one network per level, consistency between levels
