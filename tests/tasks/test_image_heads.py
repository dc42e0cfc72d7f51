"""Default target modules and the classification head of each image classifier loracli lists in
README (transformers' DINOv2, DeiT, BEiT, Swin, ConvNeXt, SigLIP, ViT; timm's ViT and EfficientNet
through transformers' TimmWrapperForImageClassification), from tiny configs (no weights): the
defaults adapt the layers the table says, the head is found and trained in full, a forward runs.
And the line naming a head that was initialised from scratch."""

from __future__ import annotations

import pytest
import torch

from lora_cli.adapters import LoraConfig, get_adapter_model
from lora_cli.hf_names import classification_heads, default_target_modules, new_heads_line

VIT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
       "image_size": 28, "patch_size": 14}


def _build(name: str):
    import transformers as t

    if name == "timm-vit":
        return t.TimmWrapperForImageClassification(t.TimmWrapperConfig(
            architecture="vit_tiny_patch16_224", num_labels=3,
            model_args={"depth": 1, "img_size": 32, "patch_size": 16, "embed_dim": 32, "num_heads": 2})), 32
    if name == "timm-efficientnet":
        return t.TimmWrapperForImageClassification(
            t.TimmWrapperConfig(architecture="tf_efficientnet_lite0", num_labels=3)), 32
    classes = {
        "dinov2": (t.Dinov2ForImageClassification, t.Dinov2Config(**VIT, num_labels=3)),
        "deit": (t.DeiTForImageClassification, t.DeiTConfig(**VIT, num_labels=3)),
        "beit": (t.BeitForImageClassification, t.BeitConfig(**VIT, num_labels=3)),
        "vit": (t.ViTForImageClassification, t.ViTConfig(**VIT, num_labels=3)),
        "swin": (t.SwinForImageClassification, t.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32,
                                                            patch_size=4, window_size=2, num_labels=3)),
        "convnext": (t.ConvNextForImageClassification, t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                                        num_labels=3)),
        "siglip": (t.SiglipForImageClassification, t.SiglipConfig(
            vision_config=VIT, num_labels=3,
            text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                         "vocab_size": 99, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})),
    }
    cls, config = classes[name]
    size = 32 if name in ("swin", "convnext") else 28
    return cls(config), size


CASES = {  # model -> (default targets, the adapted layers' last names, head)
    "dinov2": (["q_proj", "v_proj"], {"q_proj", "v_proj"}, ["classifier"]),
    "deit": (["query", "value"], {"q_proj", "v_proj"}, ["classifier"]),  # transformers-4 names, aliased
    "vit": (["query", "value"], {"q_proj", "v_proj"}, ["classifier"]),
    "beit": (["q_proj", "v_proj"], {"q_proj", "v_proj"}, ["classifier"]),
    "swin": (["q_proj", "v_proj"], {"q_proj", "v_proj"}, ["classifier"]),
    "convnext": (["pwconv1", "pwconv2"], {"pwconv1", "pwconv2"}, ["classifier"]),
    "siglip": (["q_proj", "v_proj"], {"q_proj", "v_proj"}, ["classifier"]),
    "timm-vit": (["qkv"], {"qkv"}, ["timm_model.head"]),
    "timm-efficientnet": (["conv_pw", "conv_pwl", "conv_head"], {"conv_pw", "conv_pwl", "conv_head"},
                          ["timm_model.classifier"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_default_targets_and_head(name):
    targets, adapted, heads = CASES[name]
    model, size = _build(name)
    assert default_target_modules(model) == targets
    assert classification_heads(model) == heads
    wrapped = get_adapter_model(model, LoraConfig(r=2, target_modules=targets, modules_to_save=heads,
                                                  init_lora_weights=False))
    assert {path.rsplit(".", 1)[-1] for path, _ in wrapped.adapter_layers()} == adapted
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any(f"{heads[0]}.modules_to_save." in n for n in trainable)  # the head trains in full
    assert wrapped(pixel_values=torch.randn(2, 3, size, size)).logits.shape == (2, 3)


def test_a_timm_convnet_without_pointwise_convs_has_no_default():
    """resnet18's only 1x1 convs are ``downsample.0`` (a number names other layers too): no default,
    so the recipe is asked to list its targets."""
    import transformers as t

    model = t.TimmWrapperForImageClassification(t.TimmWrapperConfig(architecture="resnet18", num_labels=3))
    assert default_target_modules(model) is None and classification_heads(model) == ["timm_model.fc"]


def test_the_new_head_line_names_size_and_what_it_replaced():
    model, _ = _build("dinov2")
    assert new_heads_line(model, {"missing_keys": {"classifier.weight", "classifier.bias"}}) == \
        "new head: classifier (64 -> 3 classes), initialised from scratch"
    timm, _ = _build("timm-efficientnet")
    info = {"missing_keys": set(), "mismatched_keys": {("timm_model.classifier.weight", (1000, 1280), (3, 1280)),
                                                       ("timm_model.classifier.bias", (1000,), (3,))}}
    assert new_heads_line(timm, info) == ("new head: timm_model.classifier (1280 -> 3 classes, replacing the "
                                          "checkpoint's 1000-class head), initialised from scratch")
    assert new_heads_line(model, {"missing_keys": set(), "mismatched_keys": set()}) is None


def test_a_pretrained_folder_reports_its_new_head(tmp_path):
    """Through the task's own loading path: the line is on the model for `train` to print."""
    from transformers import BitImageProcessor

    from lora_cli.recipe import ModelSection
    from lora_cli.tasks import image_classification as ic
    from lora_cli.tasks.quantization import NEW_HEADS_NOTE

    base, _ = _build("dinov2")
    base.dinov2.save_pretrained(tmp_path / "base")  # a backbone without a head, as the packaged DINOv2
    BitImageProcessor().save_pretrained(tmp_path / "base")
    model = ic.build_model(ModelSection(name_or_path=str(tmp_path / "base")), ["a", "b", "c", "d"])
    assert getattr(model, NEW_HEADS_NOTE) == "new head: classifier (64 -> 4 classes), initialised from scratch"
    assert model.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"} and model.config.label2id["d"] == 3
