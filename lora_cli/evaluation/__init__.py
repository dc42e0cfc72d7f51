"""Evaluation shared by `train` (its final eval.json) and `eval`: metrics, reports, plots.

It knows models, datasets and run-directory names, not the Trainer and not the verbs.
"""
