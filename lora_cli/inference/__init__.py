"""Using a trained run: evaluate it, merge its adapter, classify images with it.

    images.py    load_image / expand_inputs: any user file to an upright RGB image
    predict.py   predict_files + table / JSON / CSV renderers; load_merged
    merge.py     merge_run: merge_and_unload, logit verification, atomic save
    evaluate.py  evaluate / score / write_report / report_tables
    metrics.py   confusion matrix, per-class scores, macro-F1, top-k, loss
    plots.py     confusion matrix and training-curve PNGs
    runs.py      the same verbs on a run directory (what the CLI calls)
"""
