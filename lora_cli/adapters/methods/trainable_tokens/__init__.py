"""Trainable tokens: a few embedding rows trained, alone or beside LoRA (config.py: no torch; layer.py)."""
