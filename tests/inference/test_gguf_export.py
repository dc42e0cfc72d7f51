"""`loracli export --format gguf`: llama.cpp's LoRA adapter file and merged GGUF model, read back with gguf's reader.

A tiny Llama built from a config, a byte-level BPE tokenizer trained on the spot, and a LoRA
adapter with non-zero random factors (so no check passes with B = 0). The files are read
with ``gguf.GGUFReader``: metadata, tensor names, shapes, dtypes, and values against the
run's own factors in llama.cpp's layout. The llama.cpp check itself (logits of llama.cpp
against loracli's on SmolLM2) is the slow test at the end and ``python -m bench.gguf``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml

from lora_cli import rundir as rd
from lora_cli.adapters import get_adapter_model, get_method
from lora_cli.errors import UserInputError
from lora_cli.inference.gguf_export import export_gguf, rotary_rows, tokenizer_kind
from lora_cli.inference.loading import load_run
from tests.inference.runs_fixture import folder_bytes

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
TINY_LLAMA = {
    "model_type": "llama", "hidden_size": HEADS * HEAD_DIM, "num_hidden_layers": 2,
    "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "intermediate_size": 48,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "initializer_range": 0.2,
}
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def byte_level_tokenizer(folder: Path) -> Path:
    """A GPT-2-style byte-level BPE tokenizer (SmolLM2's kind), with ChatML specials and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the capital of france is paris, the capital of italy is rome. 2024 was a year"] * 20,
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return folder


def llama_run(root: Path, name: str = "llama", method: str = "lora", seed: int = 1, **fields) -> Path:
    """A complete causal-lm run on a tiny Llama (GQA: 4 query heads, 2 key/value heads), adapter non-zero."""
    from transformers import LlamaConfig, LlamaForCausalLM

    run = root / name
    tokenizer = byte_level_tokenizer(run / rd.PROCESSOR_DIR)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, vocab_size=vocab,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    base = LlamaForCausalLM(config)
    base.save_pretrained(run / rd.BASE_MODEL_DIR)
    options = {"lora": {"r": 4, "lora_alpha": 8}, "loha": {"r": 4, "alpha": 8}}[method]
    fields = {"target_modules": TARGETS, **options, **fields}
    model = get_adapter_model(base, get_method(method).config_cls(**fields))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    model.save_pretrained(run / rd.ADAPTER_DIR)
    rows = [{"prompt": f"the capital of {c} is", "completion": f" {t}"} for c, t in
            [("france", "paris"), ("italy", "rome")] * 4]
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": name, "task": "causal-lm", "seed": 0, "output_dir": str(run),
        "model": {"config": dict(TINY_LLAMA), "tokenizer": str(tokenizer)},
        "data": {"train_file": str(data), "prompt_column": "prompt", "completion_column": "completion",
                 "val_split": 0.25, "max_length": 32},
        "adapter": {"method": method, **fields},
    }
    (run / rd.RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    rd.write_json(run / rd.ENV_FILE, {"seed": 0})
    rd.write_status(run, "completed")
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return llama_run(tmp_path_factory.mktemp("gguf"))


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensors(reader) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in reader.tensors}


def llama_order(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' q/k rows in llama.cpp's rotary order, written out the long way for the test:
    per head of d rows, row 2i is row i and row 2i+1 is row d/2 + i."""
    d = rows.shape[0] // heads
    out = torch.empty_like(rows)
    for h in range(heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = rows[h * d + i]
            out[h * d + 2 * i + 1] = rows[h * d + d // 2 + i]
    return out


# ---------------------------------------------------------------------------- adapter file
def test_adapter_file_holds_the_runs_factors_in_llama_cpp_layout(run, tmp_path):
    out = tmp_path / "gguf"
    report = export_gguf(run, out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.gguf", "export.json"]
    reader = gguf.GGUFReader(str(out / "adapter.gguf"))
    meta = fields(reader)
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == pytest.approx(8.0)
    found = tensors(reader)
    names = {f"blk.{i}.{k}.weight.lora_{x}" for i in range(2) for x in "ab"
             for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(found) == names and report.tensors == len(names) == 28
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)

    model = load_run(run, device="cpu").model
    layers = dict(model.adapter_layers())
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
    for i in range(2):
        for kind, path in hf.items():
            layer = layers[f"model.layers.{i}.{path}"]
            a, b = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
            b = {"attn_q": lambda t: llama_order(t, HEADS), "attn_k": lambda t: llama_order(t, KV_HEADS)}.get(
                kind, lambda t: t)(b)
            got_a, got_b = found[f"blk.{i}.{kind}.weight.lora_a"], found[f"blk.{i}.{kind}.weight.lora_b"]
            # numpy order = PyTorch's: A (r, in), B (out, r); GGUF's ne lists them reversed
            np.testing.assert_array_equal(got_a, a.numpy())
            np.testing.assert_array_equal(got_b, b.numpy())
            info = next(t for t in reader.tensors if t.name == f"blk.{i}.{kind}.weight.lora_a")
            assert list(info.shape) == [a.shape[1], a.shape[0]]  # ne = [in, r]
    assert not np.array_equal(found["blk.0.attn_q.weight.lora_b"], layers["model.layers.0.self_attn.q_proj"]
                              .lora_B["default"].detach().numpy()), "q's lora_b must be in rotary order"
    written = json.loads((out / "export.json").read_text())
    assert written["kind"] == "adapter" and written["alpha"] == 8.0 and written["ranks"] == [4]
    assert written["sha256"] == report.sha256 and written["max_rel_error"] < 1e-5


def test_adapter_read_as_llama_cpp_reads_it_reproduces_the_runs_update(run, tmp_path):
    """alpha / r * B A with the rotary order undone = the engine's delta, for q (GQA: k has fewer heads)."""
    export_gguf(run, tmp_path / "gguf")
    found = tensors(gguf.GGUFReader(str(tmp_path / "gguf" / "adapter.gguf")))
    layers = dict(load_run(run, device="cpu").model.adapter_layers())
    for kind, path, heads in (("attn_q", "q_proj", HEADS), ("attn_k", "k_proj", KV_HEADS)):
        a = torch.from_numpy(found[f"blk.1.{kind}.weight.lora_a"].copy())
        b = torch.from_numpy(found[f"blk.1.{kind}.weight.lora_b"].copy())
        gguf_delta = 8.0 / b.shape[1] * (b @ a)  # llama.cpp's scale alpha / r
        want = layers[f"model.layers.1.self_attn.{path}"].get_delta_weight("default").detach()
        torch.testing.assert_close(gguf_delta, llama_order(want, heads), atol=1e-6, rtol=1e-5)


def test_rotary_rows_match_the_long_way():
    rows = torch.arange(24.0).unsqueeze(1)
    for heads in (1, 2, 3):
        assert torch.equal(rows[rotary_rows(24, heads)], llama_order(rows, heads))


def test_per_layer_scales_fold_into_lora_b_and_float16_rounds(tmp_path):
    """rank_pattern and alpha_pattern with rsLoRA: one alpha in the file, exact per-layer updates."""
    run = llama_run(tmp_path, "patterns", r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2},
                    alpha_pattern={"down_proj": 3})
    report = export_gguf(run, tmp_path / "f32")
    assert report.folded_scaling and report.ranks == [2, 4] and report.max_rel_error < 1e-5
    found = tensors(gguf.GGUFReader(str(tmp_path / "f32" / "adapter.gguf")))
    alpha = report.alpha
    layers = dict(load_run(run, device="cpu").model.adapter_layers())
    for kind, path in (("attn_v", "self_attn.v_proj"), ("ffn_down", "mlp.down_proj"), ("ffn_up", "mlp.up_proj")):
        a, b = (torch.from_numpy(found[f"blk.0.{kind}.weight.lora_{x}"].copy()) for x in "ab")
        want = layers[f"model.layers.0.{path}"].get_delta_weight("default").detach()
        torch.testing.assert_close(alpha / b.shape[1] * (b @ a), want, atol=1e-6, rtol=1e-5)

    half = export_gguf(run, tmp_path / "f16", dtype="float16")
    reader = gguf.GGUFReader(str(tmp_path / "f16" / "adapter.gguf"))
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F16 for t in reader.tensors)
    assert 0 < half.max_rel_error < 4e-3 and half.bytes < report.bytes


def test_adapter_export_refuses_what_llama_cpp_cannot_load(tmp_path, monkeypatch, capsys):
    loha = llama_run(tmp_path, "loha", method="loha")
    with pytest.raises(UserInputError, match=r"loha adapter cannot be a GGUF LoRA.*loracli convert .* --to lora.*--merged"):
        export_gguf(loha, tmp_path / "a")
    dora = llama_run(tmp_path, "dora", use_dora=True)
    with pytest.raises(UserInputError, match=r"DoRA.*llama.cpp has no DoRA.*--merged"):
        export_gguf(dora, tmp_path / "b")
    head = llama_run(tmp_path, "head", modules_to_save=["lm_head"])
    with pytest.raises(UserInputError, match=r"modules trained in full \(lm_head"):
        export_gguf(head, tmp_path / "c")
    tied = llama_run(tmp_path, "tied", target_modules=["q_proj", "lm_head"])
    with pytest.raises(UserInputError, match="ties to the token embedding"):
        export_gguf(tied, tmp_path / "d")
    embedding = llama_run(tmp_path, "emb", target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(UserInputError, match="Linear layers only"):
        export_gguf(embedding, tmp_path / "e")
    biases = llama_run(tmp_path, "biases", bias="all")
    with pytest.raises(UserInputError, match=r"trained biases \(bias: all\)"):
        export_gguf(biases, tmp_path / "g")
    loftq = llama_run(tmp_path, "loftq")  # what LoftQ leaves beside its adapter: rewritten base weights
    from safetensors.torch import save_file

    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)},
              loftq / rd.ADAPTER_DIR / "base_rewrites.safetensors")
    with pytest.raises(UserInputError, match="base weights its init rewrote.*--merged"):
        export_gguf(loftq, tmp_path / "h")
    assert not any((tmp_path / x).exists() for x in "abcdegh")
    # through the CLI: exit 2, one line, no traceback
    code, err = cli(monkeypatch, capsys, "export", dora, "--format", "gguf", "--out", tmp_path / "f")
    assert code == 2 and "Traceback" not in err and "--merged" in err and not (tmp_path / "f").exists()


def test_other_architectures_and_tasks_are_refused_naming_the_supported_ones(tmp_path):
    run = llama_run(tmp_path, "gpt2like")
    recipe = yaml.safe_load((run / rd.RECIPE_FILE).read_text())
    recipe["model"]["config"] = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2}
    (run / rd.RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserInputError, match=r"'gpt2' model; GGUF export supports Llama-architecture bases only"):
        export_gguf(run, tmp_path / "out")
    recipe["task"] = "seq-cls"
    recipe["data"] = {"train_file": recipe["data"]["train_file"], "text_column": "prompt",
                      "label_column": "completion"}
    (run / rd.RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserInputError, match="is a seq-cls run; GGUF export is for causal-lm runs"):
        export_gguf(run, tmp_path / "out")


def test_out_folder_rules_follow_the_export_verb(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gguf"
    code, err = cli(monkeypatch, capsys, "export", run, "--format", "gguf", "--out", out)
    assert code == 0 and "adapter.gguf" in err and "llama-cli -m BASE.gguf --lora" in err
    before = folder_bytes(out)
    code, err = cli(monkeypatch, capsys, "export", run, "--format", "gguf", "--out", out)
    assert code == 2 and "not empty" in err and folder_bytes(out) == before
    code, _ = cli(monkeypatch, capsys, "export", run, "--format", "gguf", "--out", out, "--force")
    assert code == 0
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    code, err = cli(monkeypatch, capsys, "export", run, "--format", "gguf", "--out", other, "--force")
    assert code == 2 and "replaces only a folder an earlier `loracli export` wrote (it holds export.json)" in err
    assert (other / "mine.txt").read_text() == "keep"
    code, err = cli(monkeypatch, capsys, "export", run, "--format", "gguf", "--out", run / "adapter")
    assert code == 2 and "is (or lies inside) the run's own adapter" in err
    code, err = cli(monkeypatch, capsys, "export", run, "--format", "onnx", "--merged", "--out", tmp_path / "x")
    assert code == 2 and "--merged and --dtype are options of --format gguf" in err
    code, err = cli(monkeypatch, capsys, "export", run, "--format", "gguf", "--opset", "17", "--out", tmp_path / "x")
    assert code == 2 and "--exporter and --opset are options of --format onnx" in err
    code, err = cli(monkeypatch, capsys, "export", run, "--format", "gguf", "--dtype", "bfloat16", "--out", tmp_path / "x")
    assert code == 2 and "choose one of float32, float16" in err and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- merged model
def test_merged_model_holds_the_verified_merged_weights_and_the_tokenizer(run, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    report = export_gguf(run, out, merged=True)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.gguf"]
    assert report.merge["max_abs_diff"] <= report.merge["tolerance"] and report.max_rel_error == 0.0
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    meta = fields(reader)
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert meta["llama.block_count"] == 2 and meta["llama.attention.head_count"] == HEADS
    assert meta["llama.attention.head_count_kv"] == KV_HEADS and meta["llama.rope.dimension_count"] == HEAD_DIM
    assert meta["llama.embedding_length"] == 32 and meta["llama.feed_forward_length"] == 48
    assert meta["llama.context_length"] == 64 and meta["llama.vocab_size"] == len(AutoTokenizer.from_pretrained(
        run / rd.PROCESSOR_DIR))
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    tok = AutoTokenizer.from_pretrained(run / rd.PROCESSOR_DIR)
    vocab = tok.get_vocab()
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert meta["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and set(meta["tokenizer.ggml.token_type"][3:]) == {1}
    merges = json.loads((run / rd.PROCESSOR_DIR / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.chat_template"] == TEMPLATE

    found = tensors(reader)
    assert "output.weight" not in found  # tied: llama.cpp reuses token_embd
    merged = load_run(run, device="cpu").model.merge_and_unload().state_dict()
    np.testing.assert_array_equal(found["token_embd.weight"], merged["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(found["blk.1.attn_q.weight"],
                                  llama_order(merged["model.layers.1.self_attn.q_proj.weight"], HEADS).numpy())
    np.testing.assert_array_equal(found["blk.1.attn_k.weight"],
                                  llama_order(merged["model.layers.1.self_attn.k_proj.weight"], KV_HEADS).numpy())
    np.testing.assert_array_equal(found["blk.0.ffn_down.weight"], merged["model.layers.0.mlp.down_proj.weight"].numpy())
    np.testing.assert_array_equal(found["blk.0.attn_norm.weight"],
                                  merged["model.layers.0.input_layernorm.weight"].numpy())
    from safetensors.torch import load_file  # the merged weights are not the base's

    original = load_file(run / rd.BASE_MODEL_DIR / "model.safetensors")
    assert not np.allclose(found["blk.0.ffn_down.weight"], original["model.layers.0.mlp.down_proj.weight"].numpy())


def test_merged_float16_and_other_methods(tmp_path):
    """--merged takes what `merge` takes (LoHa, DoRA); 2-D weights float16, norms float32."""
    run = llama_run(tmp_path, "loha", method="loha")
    report = export_gguf(run, tmp_path / "out", merged=True, dtype="float16")
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model.gguf"))
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert fields(reader)["general.file_type"] == 1 and report.merge["dtype"] == "float16"


def test_tokenizer_kinds_llama_cpp_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    bpe = {"model": {"type": "BPE", "byte_fallback": False, "ignore_merges": False}, "decoder": {"type": "ByteLevel"}}
    assert tokenizer_kind({**bpe, "pre_tokenizer": byte_level}, Path("r")) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert tokenizer_kind({**bpe, "pre_tokenizer": smollm}, Path("r")) == "smollm"
    from lora_cli.inference.gguf_export import LLAMA3_SPLIT

    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {**byte_level, "use_regex": False}]}
    llama3_bpe = {**bpe, "model": {**bpe["model"], "ignore_merges": True}}
    assert tokenizer_kind({**llama3_bpe, "pre_tokenizer": llama3}, Path("r")) == "llama-bpe"
    with pytest.raises(UserInputError, match="no name this export knows for"):
        tokenizer_kind({**bpe, "pre_tokenizer": llama3}, Path("r"))  # Llama 3's split needs ignore_merges
    spm = {"model": {"type": "BPE", "byte_fallback": True}, "decoder": {"type": "Sequence"}}
    with pytest.raises(UserInputError, match="not a byte-level BPE tokenizer.*without --merged"):
        tokenizer_kind(spm, Path("r"))


# ---------------------------------------------------------------------------- llama.cpp itself
def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from lora_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["loracli", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err
