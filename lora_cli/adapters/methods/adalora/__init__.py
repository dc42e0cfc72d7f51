"""AdaLoRA: its config (no torch), its layer, and its rank allocator (the method's per-model state)."""
