"""Builders for tiny models and data, shared by the tests (no downloads)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ("beignets", "churros", "macarons")

TINY_VIT = dict(
    model_type="vit",
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    image_size=32,
    patch_size=8,
)


def tiny_vit(num_labels: int = 3, seed: int = 0, **overrides):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = {k: v for k, v in TINY_VIT.items() if k != "model_type"} | overrides
    return ViTForImageClassification(ViTConfig(num_labels=num_labels, **cfg)).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(num_labels: int = 3, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99,
        max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_opt(seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=37, vocab_size=99,
        word_embed_proj_dim=32, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    return OPTForCausalLM(cfg).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(d_model=32, d_kv=8, num_layers=2, num_heads=2, d_ff=37, vocab_size=99, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def class_image(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """An image whose class shows in its colour and stripes, with noise."""
    base = np.zeros((size, size, 3), dtype=np.float32)
    base[..., label % 3] = 200
    if label % 2:
        base[::4] = 255
    noise = rng.normal(0, 25, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def make_imagefolder(root: Path, per_class: tuple[int, int] = (8, 4), classes=CLASSES, size: int = 32) -> Path:
    """root/train/<class>/*.png and root/validation/<class>/*.png."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "validation"), per_class):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                class_image(label, rng, size).save(folder / f"{name}_{i}.png")
    return root


def data_and_seed(recipe) -> tuple:
    """``(recipe.data, recipe.seed)``: the sections a task's data functions take."""
    return recipe.data, recipe.seed


def guide_transforms(processor, train: bool):
    """The Food-101 guide's per-image torchvision v1 path (PIL in, normalised tensor out): the
    reference the cached uint8 pipeline is measured against."""
    from torchvision import transforms as T

    from lora_cli.tasks.data.image_settings import from_processor

    settings = from_processor(processor)
    crop = settings.input_size
    normalize = T.Normalize(mean=settings.mean, std=settings.std)
    if train:
        return T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return T.Compose([T.Resize(settings.resize), T.CenterCrop(crop), T.ToTensor(), normalize])


_PHASE_LINE = re.compile(r"^[^:]+: ([\d,]+ \w+ \.\.\.|done, [\d,]+ of [\d,]+ \w+ in [\d.]+ s|stopped after .*)$")


def message_lines(err: str) -> list[str]:
    """stderr's lines without the progress lines of the data phases (decoding, tokenizing:
    lora_cli.progress prints a start and an end line each in a log)."""
    return [line for line in err.strip().splitlines() if line and not _PHASE_LINE.match(line)]
