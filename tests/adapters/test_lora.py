"""LoRA specifics: the guide's numbers, config validation, targeting rules, multiple
adapters, unload, the config file, and transformers-4 module names."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lora_cli.adapters import AdapterModel, LoraConfig, LoraLayer, get_adapter_model
from lora_cli.adapters.config import AdapterConfig
from lora_cli.errors import AdapterConfigError, AdapterStateError, TargetingError, UserInputError
from tests.helpers import tiny_bert, tiny_opt, tiny_vit


def _vit_inputs():
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _adapted(model: AdapterModel, name: str = "default") -> list[str]:
    return [path for path, layer in model.adapter_layers() if name in layer.r]


# ----------------------------------------------------------------- the guide's numbers


def test_guide_numbers_vit_base_food101(capsys):
    from transformers import ViTConfig, ViTForImageClassification

    with torch.device("meta"):  # vit-base from its config; counting needs no real weights
        base = ViTForImageClassification(ViTConfig(num_labels=101))
    config = LoraConfig(
        r=16, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.1, bias="none",
        modules_to_save=["classifier"],
    )
    model = get_adapter_model(base, config)
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        "trainable params: 667,493 || all params: 86,543,818 || trainable%: 0.7713\n"
    )
    assert model.get_nb_trainable_parameters() == (667_493, 86_543_818)
    # the transformers-4 names pick the same 24 modules as the current ones
    with torch.device("meta"):
        other = ViTForImageClassification(ViTConfig(num_labels=101))
    new_names = get_adapter_model(other, config.replace(target_modules=["q_proj", "v_proj"]))
    assert len(_adapted(model)) == 24
    assert _adapted(model) == _adapted(new_names)


def test_guide_numbers_opt_350m(capsys):
    from transformers import OPTConfig, OPTForCausalLM

    with torch.device("meta"):
        base = OPTForCausalLM(OPTConfig(
            hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16, vocab_size=50272,
            max_position_embeddings=2048, word_embed_proj_dim=512, do_layer_norm_before=False,
        ))
    model = get_adapter_model(base, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params: 1,572,864 || all params: 332,769,280 ||")


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"r": 0}, r"r: must be an integer >= 1"),
        ({"r": -4}, r"r: must be an integer >= 1"),
        ({"lora_dropout": 1.0}, r"lora_dropout: must be a number in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"lora_dropout: must be a number in \[0, 1\)"),
        ({"bias": "some"}, r"bias: must be one of 'none', 'all', 'lora_only'"),
        ({"init_lora_weights": "kaiming"}, r"init_lora_weights: must be one of True, False, 'gaussian', 'pissa'.*'olora'"),
        ({"init_lora_weights": "orthogonal", "r": 3}, r"init_lora_weights: 'orthogonal' needs an even r"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]: must be an integer >= 1"),
        ({"target_modules": "(unclosed"}, r"target_modules: is not a valid regular expression"),
    ],
)
def test_config_validation_names_field_and_allowed_values(kwargs, pattern):
    with pytest.raises(AdapterConfigError, match=pattern):
        LoraConfig(**kwargs)


def test_config_validation_reports_every_problem_at_once():
    with pytest.raises(AdapterConfigError, match=r"invalid lora config \(3 problems\)") as info:
        LoraConfig(r=0, lora_dropout=2, bias="yes")
    assert [p.key for p in info.value.problems] == ["r", "lora_dropout", "bias"]
    assert isinstance(info.value, UserInputError)


# ------------------------------------------------------------------------- targeting


def test_target_matching_nothing_lists_closest_names():
    with pytest.raises(TargetingError, match=r"'q_prj': closest module names are q_proj") as info:
        get_adapter_model(tiny_opt(), LoraConfig(target_modules=["q_prj"]))
    assert "v_proj" in str(info.value)  # the list of real layer names


def test_regex_targets_full_match():
    model = get_adapter_model(tiny_opt(), LoraConfig(target_modules=r".*layers\.0\.self_attn\.(q|v)_proj"))
    assert _adapted(model) == ["model.decoder.layers.0.self_attn.v_proj", "model.decoder.layers.0.self_attn.q_proj"]
    # a regex must match the whole path, not a part of it
    with pytest.raises(TargetingError, match="matched no module"):
        get_adapter_model(tiny_opt(), LoraConfig(target_modules=r"q_proj"))


@pytest.mark.parametrize(("build", "head"), [(tiny_vit, "classifier"), (tiny_opt, "lm_head"), (tiny_bert, "classifier")])
def test_all_linear_skips_the_output_layer(build, head):
    base = build()
    linear = [p for p, m in base.named_modules() if isinstance(m, nn.Linear)]
    model = get_adapter_model(base, LoraConfig(target_modules="all-linear"))
    assert head in linear
    assert sorted(_adapted(model)) == sorted(p for p in linear if p != head)


def test_exclude_modules():
    model = get_adapter_model(
        tiny_opt(), LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.1.self_attn.q_proj"])
    )
    assert sorted(_adapted(model)) == [
        "model.decoder.layers.0.self_attn.q_proj",
        "model.decoder.layers.0.self_attn.v_proj",
        "model.decoder.layers.1.self_attn.v_proj",
    ]
    regex = get_adapter_model(tiny_opt(), LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=r".*v_proj"))
    assert all(p.endswith("q_proj") for p in _adapted(regex)) and len(_adapted(regex)) == 2


def test_layers_to_transform_and_layers_pattern():
    model = get_adapter_model(tiny_opt(), LoraConfig(target_modules=["q_proj", "fc1"], layers_to_transform=1))
    assert sorted(_adapted(model)) == ["model.decoder.layers.1.fc1", "model.decoder.layers.1.self_attn.q_proj"]
    bert = get_adapter_model(
        tiny_bert(), LoraConfig(target_modules=["query"], layers_to_transform=[0], layers_pattern="layer")
    )
    assert _adapted(bert) == ["bert.encoder.layer.0.attention.self.query"]
    with pytest.raises(TargetingError, match="removed all of them"):
        get_adapter_model(tiny_opt(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(AdapterConfigError, match="layers_pattern: only has an effect together with layers_to_transform"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.pre_classifier = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.pre_classifier(self.body(x)))


def test_modules_to_save_matches_on_a_dot_boundary(tmp_path):
    model = get_adapter_model(_TwoHeads(), LoraConfig(target_modules=["body"], modules_to_save=["classifier"]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert not any("pre_classifier" in n for n in trainable)
    assert "base_model.classifier.modules_to_save.default.weight" in trainable
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert not any("pre_classifier" in k for k in keys)
    with pytest.raises(TargetingError, match=r"modules_to_save entry 'clasifier' matched no module.*classifier"):
        get_adapter_model(_TwoHeads(), LoraConfig(target_modules=["body"], modules_to_save=["clasifier"]))


def test_dora_on_grouped_conv_runs_unmerged_only():
    """DoRA on a grouped conv is supported (PEFT parity: test_lora_more_layers.py); like
    every LoRA there it cannot be merged."""
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    model = get_adapter_model(grouped, LoraConfig(target_modules=["0"], use_dora=True, init_lora_weights=False))
    assert model.targets["default"] == ["0"]
    with pytest.raises(UserInputError, match="grouped convolution .* cannot be merged"):
        model.merge_adapter()


# ----------------------------------------------------------------------- multi-adapter


def _perturb(model: AdapterModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters(name):
            param.add_(torch.randn(param.shape, generator=g) * 0.2)


def test_multi_adapter_add_set_delete_and_load(tmp_path):
    inputs = _vit_inputs()
    base_logits = _logits(tiny_vit(), inputs)
    model = get_adapter_model(tiny_vit(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["classifier"]))
    assert model.active_adapter == "default"
    _perturb(model, "default", 1)
    _perturb(model, "other", 2)
    # only the active adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".default") for n in trainable)
    default_logits = _logits(model, inputs)

    model.set_adapter("other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    other_logits = _logits(model, inputs)
    assert not torch.allclose(other_logits, default_logits) and not torch.allclose(other_logits, base_logits)

    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["r"] == 2

    loaded = AdapterModel.from_pretrained(tiny_vit(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert sorted(loaded.peft_config) == ["default", "other"]
    assert torch.equal(_logits(loaded, inputs), default_logits)
    loaded.set_adapter("other")
    assert torch.equal(_logits(loaded, inputs), other_logits)

    with pytest.raises(UserInputError, match="an adapter named 'other' already exists"):
        model.add_adapter("other", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(UserInputError, match=r"no adapter named 'nope'; have \['default', 'other'\]"):
        model.set_adapter("nope")

    # switching adapters while one is merged takes it out of the weight first (as PEFT does)
    model.set_adapter("default")
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerges the merged one"):
        model.set_adapter("other")
    torch.testing.assert_close(_logits(model, inputs), other_logits, atol=1e-5, rtol=0)
    model.set_adapter("default")

    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not any(".other" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model, inputs), default_logits, atol=1e-5, rtol=0)


def test_unload_returns_the_original_model():
    inputs = _vit_inputs()
    pristine = tiny_vit()
    model = get_adapter_model(
        tiny_vit(), LoraConfig(target_modules=["q_proj", "projection"], modules_to_save=["classifier"], init_lora_weights=False)
    )
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert type(plain.classifier) is nn.Linear and type(plain.vit.layers[0].attention.q_proj) is nn.Linear
    assert plain.state_dict().keys() == pristine.state_dict().keys()
    for key, value in pristine.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(_logits(plain, inputs), _logits(pristine, inputs), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------- config file


def test_config_json_is_peft_style(tmp_path):
    model = get_adapter_model(tiny_opt(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert data["inference_mode"] is True and data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert data["r"] == 4 and sorted(data["target_modules"]) == ["q_proj", "v_proj"]
    assert model.peft_config["default"].inference_mode is False  # saving does not freeze the live model


def test_peft_only_keys_harmless_are_ignored_enabling_ones_raise(tmp_path):
    model = get_adapter_model(tiny_opt(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    harmless = {"layer_replication": None, "megatron_config": None, "use_qalora": False, "loftq_config": {},
                "trainable_token_indices": None, "some_future_key": 3, "auto_mapping": None}
    path.write_text(json.dumps(data | harmless))
    loaded = AdapterModel.from_pretrained(tiny_opt(), tmp_path)
    assert loaded.peft_config["default"].r == 4

    path.write_text(json.dumps(data | {"layer_replication": [[0, 2], [1, 2]]}))
    with pytest.raises(UserInputError, match="'layer_replication' is set, but loracli does not implement layer replication"):
        AdapterModel.from_pretrained(tiny_opt(), tmp_path)
    with pytest.raises(UserInputError, match="no 'peft_type' key"):
        AdapterConfig.from_dict({"r": 4})
    with pytest.raises(UserInputError, match="unknown adapter method 'LORAX'"):
        AdapterConfig.from_dict({"peft_type": "LORAX"})


def test_is_trainable_controls_grads(tmp_path):
    model = get_adapter_model(tiny_opt(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    frozen = AdapterModel.from_pretrained(tiny_opt(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = AdapterModel.from_pretrained(tiny_opt(), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert len(names) == 4 and all(".lora_" in n for n in names)


# ------------------------------------------------------------------------ legacy names


def test_legacy_target_names_save_portably_for_peft(tmp_path):
    """A recipe using transformers-4 names saves a config PEFT (which knows only current
    names) resolves to the same modules."""
    import peft

    inputs = _vit_inputs()
    config = LoraConfig(
        r=4, target_modules=["query", "value"], init_lora_weights=False,
        rank_pattern={"layer.1.attention.attention.query": 2}, alpha_pattern={"value": 16},
    )
    model = get_adapter_model(tiny_vit(), config).eval()
    layers = dict(model.adapter_layers())
    assert sorted(layers) == sorted(f"vit.layers.{i}.attention.{n}" for i in range(2) for n in ("q_proj", "v_proj"))
    # patterns written with the old names apply too
    assert layers["vit.layers.1.attention.q_proj"].r["default"] == 2
    assert layers["vit.layers.0.attention.q_proj"].r["default"] == 4
    assert layers["vit.layers.0.attention.v_proj"].scaling["default"] == 16 / 4
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    assert model.peft_config["default"].target_modules == ["query", "value"]  # the live config is untouched
    theirs = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs, inputs), _logits(model, inputs), atol=1e-5, rtol=0)


def test_legacy_full_path_targets():
    model = get_adapter_model(tiny_vit(), LoraConfig(target_modules=["vit.encoder.layer.1.attention.attention.query"]))
    assert _adapted(model) == ["vit.layers.1.attention.q_proj"]
    mts = get_adapter_model(tiny_vit(), LoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
    assert "classifier" in dict(mts._wrappers())


def test_legacy_layers_pattern(tmp_path):
    """layers_pattern "layer" (ViT's transformers-4 ``encoder.layer.N``) still picks layers,
    and the saved adapter gives PEFT the same modules."""
    import peft

    inputs = _vit_inputs()
    config = LoraConfig(
        target_modules=["query", "value"], layers_to_transform=[1], layers_pattern="layer", init_lora_weights=False
    )
    model = get_adapter_model(tiny_vit(), config).eval()
    assert sorted(_adapted(model)) == ["vit.layers.1.attention.q_proj", "vit.layers.1.attention.v_proj"]
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs, inputs), _logits(model, inputs), atol=1e-5, rtol=0)


def test_adapter_file_that_does_not_fit_the_model(tmp_path):
    model = get_adapter_model(tiny_opt(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"r": 8}))
    with pytest.raises(AdapterStateError, match=r"shape mismatch: .*q_proj.lora_A.weight: file \(4, 32\) vs model \(8, 32\)"):
        AdapterModel.from_pretrained(tiny_opt(), tmp_path)
    path.write_text(json.dumps(data | {"target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(AdapterStateError, match=r"missing 4 tensor\(s\), e.g. .*v_proj.lora_A.weight"):
        AdapterModel.from_pretrained(tiny_opt(), tmp_path)
    with pytest.raises(UserInputError, match="no adapter_config.json in"):
        AdapterModel.from_pretrained(tiny_opt(), tmp_path / "nowhere")


def test_modules_to_save_are_not_also_adapted():
    """PEFT writes "all-linear" out as a list of paths that includes the head; the head it
    also lists in modules_to_save is trained in full, not given an adapter."""
    model = get_adapter_model(tiny_vit(), LoraConfig(target_modules=["q_proj", "classifier"], modules_to_save=["classifier"]))
    assert sorted(_adapted(model)) == ["vit.layers.0.attention.q_proj", "vit.layers.1.attention.q_proj"]
    assert not any(isinstance(m, LoraLayer) for m in model.base_model.classifier.modules())
    with pytest.raises(TargetingError, match="modules_to_save removed all of them"):
        get_adapter_model(tiny_vit(), LoraConfig(target_modules=["classifier"], modules_to_save=["classifier"]))
