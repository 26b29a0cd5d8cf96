"""What every pipeline stage shares, torch-free: user errors, atomic files, contour drawing, dataset specs.

Nothing here imports torch or any other package of this project, so `gaze/` (the first stage) and the
training engine can both build on it without borrowing from each other.
"""
