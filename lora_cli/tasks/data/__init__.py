"""The data machinery the four tasks share: rows in, batches out. No task module is imported here.

- ``common.py``: where rows come from for every task: hub datasets, CSV/JSON(L) files, the
  train/eval split, row references in messages, label cleaning and encoding, column checks.
- ``images.py``: the one image loader and checker every verb uses (``load_image``,
  ``check_image``, ``expand_inputs``).
- ``image_data.py``: every image-classification source (digits, imagefolder, CSV/JSONL, hub) as
  splits with a ClassLabel column and an undecoded image column.
- ``image_settings.py``: an image model's input size, resize, interpolation, mean and std,
  resolved once from the checkpoint's processor and the recipe's ``model.processor``.
- ``image_cache.py``: the decode cache (every image decoded once, stored as resized uint8 pixels).
- ``image_batches.py``: batches from that cache: uint8 crops and flips keyed by (seed, epoch, row),
  collate, and normalisation on the model's device.
- ``text_common.py``: what the three text tasks share: model and tokenizer paths and loading,
  text splits, tokenising, padding, generation settings.
- ``chat.py``: conversations -> token ids and labels through a chat template (loss on the
  assistant turns).
- ``packing.py``: several tokenized causal-LM rows per ``max_length`` sequence.
"""
