"""Using a trained run: rebuild it, evaluate it, merge its adapter, predict with it.

    loading.py   load_run: a run directory back to recipe, task, processor and AdapterModel
    runs.py      eval / merge / predict on a run directory (what the CLI calls), minus printing
    merge.py     merge_run: merge_and_unload, logit verification, atomic save
    predict.py   predict_files + table / JSON / CSV renderers; load_merged

Metrics, eval.json and plots live in :mod:`lora_cli.evaluation` (``train`` uses them too).
"""
