"""``target_modules: []`` with ``modules_to_save``: no adapter layer, only the listed modules train
(the head alone is a linear probe; the head and the backbone is full fine-tuning)."""

from __future__ import annotations

import torch

from lora_cli.adapters import LoraConfig, get_adapter_model
from tests.helpers import tiny_vit


def test_head_only_trains_the_head_alone():
    model = get_adapter_model(tiny_vit(num_labels=3), LoraConfig(target_modules=[], modules_to_save=["classifier"]))
    assert list(model.adapter_layers()) == []
    head = sum(p.numel() for p in tiny_vit(num_labels=3).classifier.parameters())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == head and total > 10 * head
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("classifier" in n for n in names)


def test_listing_the_backbone_trains_everything_and_saves_it(tmp_path):
    model = get_adapter_model(tiny_vit(num_labels=3), LoraConfig(target_modules=[], modules_to_save=["vit", "classifier"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in tiny_vit(num_labels=3).parameters())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    pixels = torch.randn(2, 3, 32, 32)
    model.eval()
    expected = model(pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    from lora_cli.adapters import load_adapter_model

    again = load_adapter_model(tiny_vit(num_labels=3), tmp_path).eval()
    torch.testing.assert_close(again(pixel_values=pixels).logits, expected)


def test_a_module_inside_another_listed_one_is_saved_with_it_whichever_comes_first(tmp_path):
    """timm's wrapper: the head (found by get_classifier) sits inside the body (`timm_model`) that
    full fine-tuning lists; the inner one named first was wrapped as well, two copies of one tensor
    that the checkpoint's safetensors refused after training (bench.real, EfficientNet, 'full')."""
    from safetensors.torch import load_file

    for order in (["query", "vit"], ["vit", "query"]):
        model = get_adapter_model(tiny_vit(num_labels=3), LoraConfig(target_modules=[], modules_to_save=order))
        wrapped = [name for name, _ in model._wrappers()]
        assert wrapped == ["vit"], wrapped  # not also vit's query (q_proj) layers inside it
        model.save_pretrained(tmp_path / order[0])
        saved = load_file(tmp_path / order[0] / "adapter_model.safetensors")
        assert any("attention.q_proj" in k for k in saved) and not any("q_proj.modules_to_save" in k for k in saved)
