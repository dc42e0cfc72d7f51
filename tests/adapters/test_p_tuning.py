"""P-tuning against PEFT (the oracle): parameter counts, logits, losses, generation, files both ways.

Every prompt encoder (and trained head) is perturbed before it is compared or saved, so the
virtual tokens are far from their initialisation and a dropped or misplaced tensor shows.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

from lora_cli.adapters import get_adapter_model, load_adapter_model
from lora_cli.adapters.methods.p_tuning.config import PromptEncoderConfig
from lora_cli.adapters.methods.p_tuning.model import PromptLearningModel
from lora_cli.errors import AdapterConfigError, UserInputError
from tests.helpers import tiny_bert, tiny_gpt2, tiny_opt, tiny_t5, tiny_vit

ATOL = 1e-5
N = 4
MODELS = {"bert": (tiny_bert, "SEQ_CLS"), "gpt2": (tiny_gpt2, "CAUSAL_LM"), "opt": (tiny_opt, "CAUSAL_LM"),
          "t5": (tiny_t5, "SEQ_2_SEQ_LM")}
CASES = [(name, enc) for name in MODELS for enc in ("MLP", "LSTM")]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on right padding and loss types
        yield


def _inputs(name: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if name == "bert":
        out["token_type_ids"] = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]])
    elif name == "t5":
        out["decoder_input_ids"] = ids[:, :4]
    else:
        out["labels"] = ids.masked_fill(mask == 0, -100)
    return out


def _ours(name: str, enc: str = "MLP", **kw) -> PromptLearningModel:
    build, task = MODELS[name]
    config = PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_hidden_size=16,
                                 encoder_reparameterization_type=enc, **kw)
    model = get_adapter_model(build(), config)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def _peft(name: str, enc: str = "MLP") -> peft.PeftModel:
    build, task = MODELS[name]
    config = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_hidden_size=16,
                                      encoder_reparameterization_type=enc)
    model = peft.get_peft_model(build(), config)
    torch.manual_seed(8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def _line(model, capsys) -> str:
    model.print_trainable_parameters()
    return capsys.readouterr().out.strip()


def test_peft_guide_example_on_roberta_large_shape_built_on_meta(capsys):
    """20 tokens, hidden 128, token dim 1024 (24 layers, 16 heads): 300,288 in the prompt encoder."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)
    with torch.device("meta"):
        ours = get_adapter_model(RobertaForSequenceClassification(cfg),
                                 PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=20, encoder_hidden_size=128))
        theirs = peft.get_peft_model(RobertaForSequenceClassification(cfg),
                                     peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=20,
                                                              encoder_hidden_size=128))
    assert sum(p.numel() for p in ours.prompt_encoder.parameters()) == 300_288
    config = ours.peft_config["default"]
    assert (config.token_dim, config.num_layers, config.num_attention_heads, config.num_transformer_submodules) == (
        1024, 24, 16, 1)
    line = _line(ours, capsys)
    assert line == _line(theirs, capsys)
    # the classification head (1,051,650) trains beside the encoder, as in PEFT
    assert line.startswith("trainable params: 1,351,938 || all params: 356,713,732")


@pytest.mark.parametrize("name, enc", CASES)
def test_trainable_parameter_line_equals_peft(capsys, name, enc):
    assert _line(_ours(name, enc), capsys) == _line(_peft(name, enc), capsys)


@pytest.mark.parametrize("name, enc", CASES)
def test_saved_here_loads_in_peft_with_equal_outputs(tmp_path, name, enc):
    ours = _ours(name, enc)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(MODELS[name][0](), tmp_path).eval()
    inputs = _inputs(name)
    with torch.no_grad():
        a, b = ours(**inputs), theirs(**inputs)
    assert a.logits.shape[1] == inputs["input_ids"].shape[1] + N if name in ("gpt2", "opt") else True
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
    if "labels" in inputs:
        torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)
    # and PEFT, trained, saves what we saved: the same keys, shapes and config values
    reference = tmp_path / "peft"
    _peft(name, enc).save_pretrained(reference)
    mine, theirs_file = load_file(tmp_path / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs_file.items()}
    ours_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    peft_cfg = json.loads((reference / "adapter_config.json").read_text())
    assert set(ours_cfg) <= set(peft_cfg)
    for key in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                "num_attention_heads", "num_layers", "encoder_hidden_size", "encoder_reparameterization_type",
                "encoder_num_layers", "encoder_dropout", "inference_mode"):
        assert ours_cfg[key] == peft_cfg[key], key


@pytest.mark.parametrize("name, enc", CASES)
def test_saved_by_peft_loads_here_with_equal_outputs(tmp_path, name, enc):
    theirs = _peft(name, enc)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter_model(MODELS[name][0](), tmp_path)
    assert isinstance(ours, PromptLearningModel) and not ours.training
    assert ours.get_nb_trainable_parameters()[0] == 0  # inference mode, as PEFT loads it
    inputs = _inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=ATOL, rtol=0)


def _lively_t5():
    """tiny_t5 with larger initial weights: the default one decodes token 0 whatever the input."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, num_layers=2, num_heads=2, d_ff=37, vocab_size=99,
                                               decoder_start_token_id=0, initializer_factor=5.0)).eval()


def test_seq2seq_generate_equals_peft(tmp_path):
    ours = get_adapter_model(_lively_t5(), PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N,
                                                               encoder_hidden_size=16))
    with torch.no_grad():
        for p in ours.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_lively_t5(), tmp_path).eval()
    ids = _inputs("t5")["input_ids"]
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 6, "do_sample": False}
    a = ours.generate(**kwargs)
    assert torch.equal(a, theirs.generate(**kwargs))
    with ours.disable_adapter():
        assert not torch.equal(a, ours.generate(**kwargs)), "the virtual tokens should steer generation"


def _greedy_by_forward(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), dim=1)
    return seq


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_causal_generate_equals_greedy_decoding_by_forward(tmp_path, name):
    """The oracle is our forward (PEFT-equal, above) run on the whole sequence at every step, no
    cache: PEFT 0.21's own generate, under transformers 5, misses the cache these models name
    ``cache`` and prepends the prompt again at every step (on OPT it fails outright). Its first
    token, from the prefill step, is still compared."""
    model = _ours(name)
    ids = _inputs(name)["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(out, _greedy_by_forward(model, ids, 5))
    model.save_pretrained(tmp_path)
    if name == "gpt2":
        theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
        first = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
        assert torch.equal(out[:, : ids.shape[1] + 1], first)
    with model.disable_adapter():
        assert not torch.equal(out, model.generate(input_ids=ids, max_new_tokens=5, do_sample=False))


def test_left_padded_generate_equals_unpadded_rows():
    """predict pads prompts on the left: a padded row decodes as it does alone."""
    model = _ours("gpt2")
    ids = _inputs("gpt2")["input_ids"]
    short = ids[1:, 2:]
    padded = torch.cat((torch.zeros(1, 2, dtype=ids.dtype), short), dim=1)
    mask = torch.cat((torch.zeros(1, 2, dtype=ids.dtype), torch.ones_like(short)), dim=1)
    batch_ids, batch_mask = torch.cat((ids[:1], padded)), torch.cat((torch.ones_like(ids[:1]), mask))
    out = model.generate(input_ids=batch_ids, attention_mask=batch_mask, max_new_tokens=4, do_sample=False)
    alone = model.generate(input_ids=short, attention_mask=torch.ones_like(short), max_new_tokens=4, do_sample=False)
    assert torch.equal(out[1:, -4:], alone[:, -4:])


def test_only_the_prompt_encoder_and_head_train_and_a_step_moves_them():
    model = _ours("bert").train()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("prompt_encoder.default.") or ".modules_to_save.default." in n for n in names)
    base = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if not p.requires_grad}
    before = model.peft_state_dict()["prompt_embeddings"]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inputs = _inputs("bert")
    model(**inputs, labels=torch.tensor([0, 2])).loss.backward()
    optimizer.step()
    assert not torch.allclose(model.peft_state_dict()["prompt_embeddings"], before)
    assert all(torch.equal(p, base[n]) for n, p in model.base_model.named_parameters() if n in base)


def test_checkpoint_state_round_trips_the_whole_encoder():
    """--resume reads get_adapter_state_dict(): the raw MLP/LSTM, not just its output."""
    source = _ours("gpt2", "LSTM")
    state = source.get_adapter_state_dict()
    assert any(k.startswith("prompt_encoder.lstm_head.") for k in state)
    target = get_adapter_model(tiny_gpt2(), PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"))
    target.load_adapter_state_dict(state)
    torch.testing.assert_close(target.peft_state_dict(), source.peft_state_dict())
    # saving from a given state (a sharded model's gathered copy) computes the same prompt
    torch.testing.assert_close(target.peft_state_dict(raw=state), source.peft_state_dict())


def test_disabled_adapter_is_the_base_model():
    model = _ours("bert")
    inputs = _inputs("bert")
    with torch.no_grad():
        with model.disable_adapter():
            off = model(**inputs).logits
        on = model(**inputs).logits
        plain = tiny_bert()(**inputs).logits
    torch.testing.assert_close(off, plain)
    assert not torch.allclose(on, plain)


def test_causal_lm_position_and_token_type_ids_are_dropped_as_peft_drops_them():
    model = _ours("gpt2")
    inputs = _inputs("gpt2")
    with torch.no_grad():
        plain = model(**inputs).logits
        with pytest.warns(UserWarning, match="position_ids are ignored"):
            shifted = model(**inputs, position_ids=torch.arange(7).expand(2, -1) + 3).logits
    torch.testing.assert_close(plain, shifted)


def test_loading_a_peft_file_as_trainable_warns_that_the_encoder_restarts(tmp_path):
    _ours("gpt2").save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="prompt embeddings only"):
        model = load_adapter_model(tiny_gpt2(), tmp_path, is_trainable=True)
    assert model.get_nb_trainable_parameters()[0] > 0


def test_merge_is_refused_with_what_to_do_instead():
    model = _ours("bert")
    with pytest.raises(UserInputError, match="no weights to merge.*adapter-only run is the deliverable"):
        model.merge_and_unload()
    with pytest.raises(UserInputError, match="no weights to merge"):
        model.merge_adapter()
    assert type(model.unload()).__name__ == "BertForSequenceClassification"


def test_config_problems_are_reported_with_the_fix():
    with pytest.raises(AdapterConfigError, match="num_virtual_tokens: is required"):
        PromptEncoderConfig(task_type="CAUSAL_LM")
    with pytest.raises(AdapterConfigError, match=r"target_modules: does not apply to p_tuning.*remove it"):
        PromptEncoderConfig(num_virtual_tokens=4, target_modules=["q_proj"])
    with pytest.raises(AdapterConfigError, match="encoder_reparameterization_type: must be one of 'MLP', 'LSTM'"):
        PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="GRU")
    assert PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="lstm").encoder_reparameterization_type == "LSTM"
    with pytest.warns(UserWarning, match="only apply to the LSTM encoder"):
        get_adapter_model(tiny_gpt2(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_num_layers=3))


def test_models_and_tasks_it_cannot_serve_are_named():
    with pytest.raises(UserInputError, match="has none.*adapter.method: lora"):
        get_adapter_model(tiny_vit(), PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    with pytest.raises(UserInputError, match="needs task_type"):
        get_adapter_model(tiny_gpt2(), PromptEncoderConfig(num_virtual_tokens=2))
    with pytest.raises(UserInputError, match="token_dim 48 does not match.*32 wide"):
        get_adapter_model(tiny_gpt2(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=48))
    with pytest.raises(UserInputError, match="one at a time"):
        model = _ours("gpt2")
        model.add_adapter("other", PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
        model.set_adapter(["default", "other"])


def test_a_second_adapter_saves_in_its_sub_folder_and_switches(tmp_path):
    model = _ours("gpt2")
    model.add_adapter("other", PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    inputs = {k: v for k, v in _inputs("gpt2").items() if k != "labels"}
    with torch.no_grad():
        first = model(**inputs).logits
        model.set_adapter("other")
        second = model(**inputs).logits
    assert first.shape[1] == 7 + N and second.shape[1] == 7 + 2
    model.save_pretrained(tmp_path)
    assert load_file(tmp_path / "other" / "adapter_model.safetensors")["prompt_embeddings"].shape == (2, 32)


def test_damaged_adapter_files_are_named(tmp_path):
    from safetensors.torch import save_file

    from lora_cli.errors import AdapterStateError

    _ours("gpt2").save_pretrained(tmp_path)
    save_file({"prompt_embeddings": torch.zeros(N + 1, 32)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterStateError, match=r"prompt_embeddings: file \(5, 32\) vs model \(4, 32\).*num_virtual_tokens"):
        load_adapter_model(tiny_gpt2(), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["num_virtual_tokens"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match=r"adapter_config.json: invalid p_tuning adapter config(?s:.*)num_virtual_tokens: is required"):
        load_adapter_model(tiny_gpt2(), tmp_path)
