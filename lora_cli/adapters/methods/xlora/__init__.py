"""X-LoRA: frozen LoRA experts mixed per token by a trained gating head.

    config.py    XLoraConfig (no torch)          experts.py   the experts' folders (no torch)
    model.py     XLoraModel                      head.py      the gating head
"""
