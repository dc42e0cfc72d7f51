"""LoRA, its variants (DoRA, MultiheadAttention, nn.Parameter targets) and its starts.

    config.py     LoraConfig (no torch)            starts.py   the table of starts (no torch)
    layer.py      LoraLayer                        inits.py    the one-layer starts (PiSSA, OLoRA, ...)
    dora.py       DoRA, a variant of the layer     mha.py      nn.MultiheadAttention
    param.py      target_parameters                passes.py   what the calibration passes share
    eva.py, corda.py, lora_ga.py                   the starts set by a calibration pass
    loftq.py, mica.py                              the starts that quantize, or freeze B
    base_rewrites.py                               a start that rewrote the base: saved and resumed exactly
"""
