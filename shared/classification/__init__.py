"""Classification (task: classification, the default): class probabilities from a model module's build(), trained
with cross-entropy, measured by top-1 / top-5, per-class F1 and a confusion matrix, exported with its signatures."""
