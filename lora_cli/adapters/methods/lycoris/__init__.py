"""The LyCORIS family: LoHa and LoKr, on one config base and one layer base.

    config.py   LycorisConfig, LoHaConfig, LoKrConfig (no torch)
    layer.py    LycorisLayer: alpha / r scaling, rank and module dropout, Tucker cores
    loha.py     LoHaLayer (Hadamard product)        lokr.py   LoKrLayer (Kronecker product)
"""
