"""The parts of a hyperparameter study (`shared.tune` runs one): what it optimizes, its search space, where it
is stored, one trial, and its outcome."""
