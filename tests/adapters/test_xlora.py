"""X-LoRA: frozen LoRA experts gated per token, against PEFT's XLoraModel (the oracle).

Experts start non-zero (``init_lora_weights=False``, a different seed each, so they differ)
and the gating head is randomised, so a dropped expert, a misnamed head tensor or a wrong
gating step changes the logits.
"""

from __future__ import annotations

import json
import shutil
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_cli.adapters import (
    AdapterModel,
    LoHaConfig,
    LoraConfig,
    get_adapter_model,
    load_adapter_model,
)
from lora_cli.adapters.methods.xlora.config import XLoraConfig
from lora_cli.adapters.methods.xlora.model import HEAD_KEY, XLoraModel
from lora_cli.errors import AdapterConfigError, AdapterStateError, UserInputError
from tests.helpers import tiny_gpt2, tiny_opt, tiny_t5

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj"]


def tiny_llama(seed: int = 0, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=99, max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


BASES = {"llama": tiny_llama, "opt": tiny_opt}


def _base(kind: str):
    model = BASES[kind]()
    model.config.use_cache = False  # PEFT's X-LoRA refuses a model with use_cache on
    return model


def _ids(rows: int = 2, seq: int = 7):
    return torch.randint(2, 99, (rows, seq), generator=torch.Generator().manual_seed(1))


def _experts(root, kind: str = "llama", names=("a", "b"), method_config=None) -> dict[str, str]:
    out = {}
    for i, name in enumerate(names):
        base = _base(kind)
        torch.manual_seed(10 + i)
        config = method_config or LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        get_adapter_model(base, config).save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def _randomise(head: torch.nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in head.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


CASES = {
    "depth1": {},
    "depth2-layerwise": {"xlora_depth": 2, "xlora_size": 8, "layerwise_scalings": True},
    "depth3-dropout": {"xlora_depth": 3, "xlora_size": 8, "xlora_dropout_p": 0.1},
    "topk-softmax": {"top_k_lora": 1, "enable_softmax_topk": True, "enable_softmax": False},
    "no-softmax": {"enable_softmax": False},
    "pass-value-weight-temperature": {"scaling_pass_value": 0.5, "global_scaling_weight": 0.7, "softmax_temperature": 0.5},
}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return {kind: _experts(root / kind, kind) for kind in BASES}


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("case", list(CASES))
def test_saved_here_loads_in_peft_with_equal_logits(tmp_path, experts, kind, case):
    ours = get_adapter_model(_base(kind), XLoraConfig(adapters=experts[kind], **CASES[case]))
    assert isinstance(ours, XLoraModel) and isinstance(ours, AdapterModel)
    _randomise(ours.internal_xlora_classifier)
    ours.eval()
    ids = _ids()
    logits = _logits(ours, ids)
    with ours.disable_adapter():
        assert not torch.allclose(_logits(ours, ids), logits, atol=1e-3), "the experts change nothing"
    ours.save_pretrained(tmp_path / "x")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_base(kind), tmp_path / "x").eval()
    assert type(theirs.base_model).__name__ == "XLoraModel"
    torch.testing.assert_close(_logits(theirs, ids), logits, atol=ATOL, rtol=1e-4)
    theirs_scalings = theirs.base_model.get_latest_scalings()
    torch.testing.assert_close(theirs_scalings, ours.latest_scalings, atol=ATOL, rtol=1e-4)

    back = load_adapter_model(_base(kind), tmp_path / "x")
    assert back.expert_names == ["a", "b"]
    torch.testing.assert_close(_logits(back, ids), logits, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["depth1", "depth2-layerwise", "topk-softmax", "pass-value-weight-temperature"])
def test_peft_model_loads_here_with_equal_logits(tmp_path, experts, case):
    """PEFT's X-LoRA folder, with every head tensor: PEFT 0.21's own save drops those whose
    name holds an expert index ('layers.0.'), which the next test covers."""
    kw = dict(CASES[case])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32,
                                  adapters={"0": experts["llama"]["a"], "1": experts["llama"]["b"]}, **kw)
        theirs = peft.get_peft_model(_base("llama"), config)
    head = theirs.base_model.internal_xlora_classifier
    _randomise(head, seed=5)
    theirs.eval()
    ids = _ids()
    expected = _logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "x")
    full = {f"base_model.internal_xlora_classifier.{k}": v.contiguous() for k, v in head.state_dict().items()}
    save_file(full, tmp_path / "x" / "adapter_model.safetensors")

    ours = load_adapter_model(_base("llama"), tmp_path / "x")
    assert isinstance(ours, XLoraModel) and ours.expert_names == ["a", "b"]  # the experts' folder names
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=1e-4)


def test_peft_lossy_save_is_refused_with_the_reason(tmp_path, experts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32,
                                  adapters={"0": experts["llama"]["a"], "1": experts["llama"]["b"]})
        peft.get_peft_model(_base("llama"), config).save_pretrained(tmp_path / "x")
    with pytest.raises(AdapterStateError, match=r"lacks .*layers\.0\.weight.*PEFT 0\.21"):
        load_adapter_model(_base("llama"), tmp_path / "x")


def test_files_are_peft_layout_and_the_folder_can_move(tmp_path, experts):
    ours = get_adapter_model(_base("llama"), XLoraConfig(adapters=experts["llama"], xlora_depth=2, xlora_size=8))
    _randomise(ours.internal_xlora_classifier)
    ours.eval()
    ids = _ids()
    logits = _logits(ours, ids)
    ours.save_pretrained(tmp_path / "x")
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["peft_type"] == "XLORA" and config["hidden_size"] == 32 and config["xlora_depth"] == 2
    assert list(config["adapters"]) == ["0", "1"]
    assert config["adapters"]["0"].endswith("/x/a") and "target_modules" not in config
    keys = set(load_file(tmp_path / "x" / "adapter_model.safetensors"))
    assert keys == {HEAD_KEY + k for k in ("layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias")}
    for name in ("a", "b"):  # each expert a plain PEFT LoRA folder
        assert json.loads((tmp_path / "x" / name / "adapter_config.json").read_text())["peft_type"] == "LORA"
        expert = peft.PeftModel.from_pretrained(_base("llama"), tmp_path / "x" / name)
        assert sum("lora_A" in k for k in expert.state_dict()) == 4

    shutil.move(tmp_path / "x", tmp_path / "moved")  # the recorded absolute paths are gone
    back = load_adapter_model(_base("llama"), tmp_path / "moved")
    assert back.expert_names == ["a", "b"]
    torch.testing.assert_close(_logits(back, ids), logits, atol=0, rtol=0)


def test_only_the_head_trains_and_a_step_moves_only_it(experts):
    model = get_adapter_model(_base("llama"), XLoraConfig(adapters=experts["llama"], xlora_depth=2, xlora_size=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"internal_xlora_classifier.layers.{i}.{t}" for i in (0, 3) for t in ("weight", "bias")}
    assert model.get_nb_trainable_parameters()[0] == 32 * 8 + 8 + 8 * 2 + 2
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    head = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = _ids(4, 6)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    assert any(not torch.equal(dict(model.named_parameters())[n], before) for n, before in head.items())


def test_trainable_experts_train_save_and_load(tmp_path, experts):
    model = get_adapter_model(_base("llama"), XLoraConfig(adapters=experts["llama"], use_trainable_adapters=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A.a" in n for n in trainable) and any(".lora_B.b" in n for n in trainable)
    state = model.get_adapter_state_dict()
    assert any(k.startswith("xlora_experts.a.base_model.model.") for k in state)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1)
    model.eval()
    ids = _ids()
    logits = _logits(model, ids)
    model.save_pretrained(tmp_path / "x")
    back = load_adapter_model(_base("llama"), tmp_path / "x")
    torch.testing.assert_close(_logits(back, ids), logits, atol=0, rtol=0)
    fresh = get_adapter_model(_base("llama"), XLoraConfig(adapters=experts["llama"], use_trainable_adapters=True))
    fresh.load_adapter_state_dict(state)  # the checkpoint round trip (--resume)
    assert torch.equal(fresh.get_adapter_state_dict()[next(iter(state))], state[next(iter(state))])


def test_scalings_are_reported_per_token_layer_and_expert(experts):
    model = get_adapter_model(_base("llama"), XLoraConfig(adapters=experts["llama"], top_k_lora=1,
                                                          enable_softmax_topk=True, enable_softmax=False))
    _randomise(model.internal_xlora_classifier)
    model.eval()
    model.scalings_log = []
    weights = model.token_scalings({"input_ids": _ids(2, 5)})
    assert weights.shape == (2, 5, 4, 2)  # 2 decoder layers x (q_proj, v_proj)
    assert len(model.scalings_log) == 1 and torch.equal(model.scalings_log[0], model.latest_scalings)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5, 4))
    assert set(weights.unique().tolist()) <= {0.0, 1.0}


def test_generate_matches_peft(tmp_path, experts):
    ours = get_adapter_model(_base("llama"), XLoraConfig(adapters=experts["llama"]))
    _randomise(ours.internal_xlora_classifier)
    ours.eval()
    ours.save_pretrained(tmp_path / "x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_base("llama"), tmp_path / "x").eval()
    ids = _ids(1, 4)
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(input_ids=ids, **kw), theirs.generate(input_ids=ids, **kw))


def test_merge_is_refused_with_what_to_do(experts):
    model = get_adapter_model(_base("llama"), XLoraConfig(adapters=experts["llama"]))
    for verb in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(UserInputError, match="cannot be merged.*PEFT cannot merge X-LoRA either.*loracli merge <expert run>"):
            verb()
    plain = model.unload()
    assert not any("lora_" in n for n, _ in plain.named_parameters())


def test_a_loracli_run_directory_is_an_expert(tmp_path, experts):
    run = tmp_path / "run-a"
    shutil.copytree(experts["llama"]["a"], run / "adapter")
    config = XLoraConfig(adapters={"a": str(run), "b": experts["llama"]["b"]})
    model = get_adapter_model(_base("llama"), config)
    assert model.expert_names == ["a", "b"] and len(list(model.adapter_layers())) == 4


def test_bad_experts_are_reported_by_name(tmp_path, experts):
    (tmp_path / "empty").mkdir()
    loha = _experts(tmp_path / "loha", names=("h",), method_config=LoHaConfig(r=2, target_modules=TARGETS))
    with pytest.raises(AdapterConfigError) as info:
        XLoraConfig(adapters={"gone": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"), "h": loha["h"],
                              "default": experts["llama"]["a"]}, top_k_lora=9)
    text = str(info.value)
    assert "adapters['gone']: does not exist" in text
    assert "adapters['empty']: is not an adapter folder nor a loracli run" in text
    assert "adapters['h']: is a loha adapter" in text and "method: lora" in text
    assert "adapters['default']: is not a usable expert name" in text
    assert "top_k_lora: must be an integer from 1 to the number of experts (4)" in text
    with pytest.raises(AdapterConfigError, match="adapters: must map each expert"):
        XLoraConfig()
    with pytest.raises(AdapterConfigError, match="target_modules: is not an X-LoRA setting"):
        XLoraConfig(adapters=experts["llama"], target_modules=["q_proj"])


def test_an_expert_of_another_base_is_refused(tmp_path, experts):
    folder = tmp_path / "other"
    shutil.copytree(experts["llama"]["a"], folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = "org/other-model"
    (folder / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(AdapterConfigError, match=r"adapters\['o'\]: was trained on base model org/other-model, not org/x"):
        XLoraConfig(adapters={"o": str(folder)}, base_model_name_or_path="org/x")
    with pytest.raises(AdapterStateError, match=r"X-LoRA expert 'o' .*does not fit this model"):  # other shapes
        get_adapter_model(tiny_llama(hidden=48), XLoraConfig(adapters={"o": str(folder)}))
    with pytest.raises(UserInputError, match=r"X-LoRA expert 'o' .*matched no module"):  # another architecture
        get_adapter_model(tiny_gpt2(), XLoraConfig(adapters={"o": str(folder)}))


def test_hidden_size_must_match_and_is_read_from_the_model(experts):
    model = get_adapter_model(_base("llama"), XLoraConfig(adapters=experts["llama"]))
    assert model.hidden_size == 32
    with pytest.raises(UserInputError, match="hidden_size is 64 but the base model's hidden size is 32"):
        get_adapter_model(_base("llama"), XLoraConfig(adapters=experts["llama"], hidden_size=64))


def test_embedding_experts_match_peft(tmp_path):
    """Experts on the token embedding too: the weight applies after the lookup, as in PEFT."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    folders = _experts(tmp_path / "emb", method_config=config)
    ours = get_adapter_model(_base("llama"), XLoraConfig(adapters=folders, layerwise_scalings=True))
    assert [layer.kind for _, layer in ours.adapter_layers()][0] == "embedding"
    _randomise(ours.internal_xlora_classifier)
    ours.eval()
    ids = _ids()
    logits = _logits(ours, ids)
    ours.save_pretrained(tmp_path / "x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_base("llama"), tmp_path / "x").eval()
    torch.testing.assert_close(_logits(theirs, ids), logits, atol=ATOL, rtol=1e-4)


def test_gpt2_conv1d_experts_are_gated_and_round_trip(tmp_path):
    """GPT-2's Conv1D layers work here; PEFT 0.21's X-LoRA cannot load GPT-2 experts at all
    (its key rewriting assumes a ``model.`` sub-module), so this case has no oracle."""
    folders = {}
    for i, name in enumerate(("a", "b")):
        base = tiny_gpt2()
        torch.manual_seed(20 + i)
        get_adapter_model(base, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)).save_pretrained(
            tmp_path / name)
        folders[name] = str(tmp_path / name)
    gpt2 = tiny_gpt2()
    ours = get_adapter_model(gpt2, XLoraConfig(adapters=folders))
    assert gpt2.config.use_cache is False  # set for the user: cached tokens would keep stale scalings
    _randomise(ours.internal_xlora_classifier)
    ours.eval()
    ids = _ids()
    logits = _logits(ours, ids)
    with ours.disable_adapter():
        base_logits = _logits(ours, ids)
    single = {}
    for name in ("a", "b"):  # the mix lies between the experts alone (softmax weights in (0, 1))
        alone = load_adapter_model(tiny_gpt2(), folders[name])
        single[name] = _logits(alone, ids)
    assert not torch.allclose(logits, base_logits, atol=1e-3)
    assert not torch.allclose(logits, single["a"], atol=1e-3) and not torch.allclose(logits, single["b"], atol=1e-3)
    ours.save_pretrained(tmp_path / "x")
    torch.testing.assert_close(_logits(load_adapter_model(tiny_gpt2(), tmp_path / "x"), ids), logits, atol=0, rtol=0)


def test_the_experts_are_fixed_and_all_active(experts):
    model = get_adapter_model(_base("llama"), XLoraConfig(adapters=experts["llama"]))
    assert model.active_adapters == ["a", "b"] and model.active_adapter == "default"
    assert isinstance(model.peft_config["default"], XLoraConfig)
    for verb in (lambda: model.set_adapter("a"), lambda: model.delete_adapter("b"),
                 lambda: model.add_adapter("c", LoraConfig(target_modules=TARGETS)),
                 lambda: model(input_ids=_ids(), adapter_names=["a", "b"])):
        with pytest.raises(UserInputError, match="fixed when it is built|not for X-LoRA"):
            verb()
    model.set_adapter(["b", "a"])  # the same experts: allowed, the head's order is kept
    assert model.expert_names == ["a", "b"]
    with pytest.raises(UserInputError, match="decoder-only causal LMs"):
        get_adapter_model(tiny_t5(), XLoraConfig(adapters=experts["llama"]))
