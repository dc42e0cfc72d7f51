"""Prompt learning (p-tuning): virtual tokens in front of a frozen text model's input.

    config.py   PromptLearningConfig, PromptEncoderConfig (no torch)
    model.py    PromptLearningModel: prepends the prompts, saves them in PEFT's layout
    encoder.py  PromptEncoder: p-tuning's table + MLP / LSTM
"""
