"""GGUF files as llama.cpp reads them: tensor names, the rotary layout, a whole model with its
tokenizer, and reading a file back (``gguf_export`` writes the adapter file and the report).

- **Merged model** (``model.gguf``): ``general.type = model``, the ``llama.*`` hyperparameters,
  the tokenizer (``tokenizer.ggml.*``: token list, types, merges, special ids, whether BOS /
  EOS are added, the pre-tokenizer's name) and the chat template (``tokenizer.chat_template``);
  every tensor of the merged model under its GGUF name, 2-D weights in ``dtype``, norms in
  float32; a tied ``lm_head`` is not written (llama.cpp reuses ``token_embd``).
- **Rotary layout**: llama.cpp's Llama keeps q_proj's and k_proj's output rows in another
  order than transformers. Within each head of d rows, GGUF row ``2i + j`` is transformers'
  row ``j * d/2 + i`` (heads: ``num_attention_heads`` for q, ``num_key_value_heads`` for k).
  The same permutation applies to merged q/k weights and biases and to the rows of a q/k
  ``lora_b`` (A is untouched).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_cli.errors import LoraCliError, UserInputError

logger = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "llama"}
"""transformers model_type -> llama.cpp architecture name this export writes."""
DTYPES = {"float32": np.float32, "float16": np.float16}


class GgufExportError(LoraCliError):
    """The GGUF file does not hold what the run's adapter or merged model is; nothing was written."""


def check_architecture(model_type: str | None, run_dir: Path) -> str:
    """The llama.cpp architecture name for a transformers model_type, or exit 2 naming the supported ones."""
    if model_type not in ARCHITECTURES:
        raise UserInputError(
            f"{run_dir}: the base model is a {model_type!r} model; GGUF export supports Llama-architecture "
            f"bases only (model_type {', '.join(ARCHITECTURES)}: Llama 2/3, SmolLM2, TinyLlama, ...). "
            "Use `loracli merge RUN --out DIR` for a transformers folder instead"
        )
    return ARCHITECTURES[model_type]


LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
"""The split regex of Llama 3's tokenizer.json, which llama.cpp runs as pre-tokenizer "llama-bpe"."""


def rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """Row index that puts transformers' q/k rows into llama.cpp's rotary order: ``gguf = hf[index]``.

    Per head of d rows, GGUF row 2i + j holds transformers' row j * d/2 + i."""
    d = rows // heads
    if d * heads != rows or d % 2:
        raise LoraCliError(f"cannot split {rows} q/k rows into {heads} heads of an even size")
    p = torch.arange(rows)
    head, within = p // d, p % d
    return head * d + (within % 2) * (d // 2) + within // 2


def rotary_heads(config: Any) -> dict[str, int]:
    """GGUF tensor kind -> head count for the q/k rows that llama.cpp stores in rotary order."""
    heads = config.num_attention_heads
    return {"attn_q": heads, "attn_k": getattr(config, "num_key_value_heads", None) or heads}


def gguf_kind(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``attn_q``; ``output.weight`` -> ``output``."""
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def to_rotary(tensor: torch.Tensor, gguf_name: str, heads: dict[str, int], inverse: bool = False) -> torch.Tensor:
    """Rows of a q/k weight, bias or lora_b into llama.cpp's order (or back with ``inverse``)."""
    count = heads.get(gguf_kind(gguf_name))
    if count is None:
        return tensor
    index = rotary_rows(tensor.shape[0], count)
    if inverse:
        index = torch.argsort(index)
    return tensor[index]


def name_map(config: Any, architecture: str) -> Any:
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    return gguf.get_tensor_name_map(arch, config.num_hidden_layers)



def rope_settings(config: Any, run_dir: Path) -> dict[str, Any]:
    """theta and scaling of the rotary embedding; exit 2 for a scaling this export cannot write."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:  # transformers 4 names
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0), **(getattr(config, "rope_scaling", None) or {})}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise UserInputError(
            f"{run_dir}: the base uses {kind!r} rotary scaling; --merged writes bases with default or linear rope "
            "scaling only. Export the adapter (without --merged) and use it with the base's own GGUF"
        )
    return {"theta": float(params.get("rope_theta", 10000.0)), "linear_factor": params.get("factor") if kind == "linear" else None}


def tokenizer_kind(tokenizer_json: dict[str, Any], run_dir: Path) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json; exit 2 for any other tokenizer.

    Recognised (each the exact pre-tokenizer llama.cpp runs under that name): GPT-2's ByteLevel
    regex ("gpt-2"), digits split one by one before it (SmolLM/SmolLM2, "smollm"), and Llama 3's
    split regex ("llama-bpe", with ignore_merges as Llama 3 has it)."""
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    fix = ("export the adapter (without --merged) and use it with the base model's own GGUF, or convert `loracli "
           "merge` output with llama.cpp's convert_hf_to_gguf.py")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UserInputError(
            f"{run_dir}: the run's tokenizer is not a byte-level BPE tokenizer (model {model.get('type')}, decoder "
            f"{decoder.get('type')}); --merged writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3). {fix}"
        )
    if tokenizer_json.get("normalizer"):
        raise UserInputError(f"{run_dir}: the run's tokenizer normalises text "
                             f"({tokenizer_json['normalizer'].get('type')}), which llama.cpp would not do. {fix}")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else {}
    ignore_merges = bool(model.get("ignore_merges"))
    name = None
    if byte_level and not byte_level.get("add_prefix_space"):
        if kinds == ["ByteLevel"] and byte_level.get("use_regex", True) and not ignore_merges:
            name = "gpt-2"
        elif (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True)
              and not ignore_merges):
            name = "smollm"
        elif (kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True) and ignore_merges
              and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT
              and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
            name = "llama-bpe"
    if name is None:
        raise UserInputError(
            f"{run_dir}: the run's tokenizer splits text with a pre-tokenizer llama.cpp has no name this export "
            f"knows for ({' + '.join(map(str, kinds)) or 'none'}); --merged knows GPT-2's, SmolLM2's and Llama 3's. {fix}"
        )
    return name


def write_model_gguf(model_dir: str | Path, path: str | Path, dtype: str = "float32",
                     name: str | None = None) -> dict[str, Any]:
    """A transformers Llama folder (config.json, safetensors, tokenizer) as a GGUF model at ``path``,
    read back and checked; returns {tensors, max_abs_diff, tokenizer}. The merged export calls it
    on the verified merged folder; ``bench.gguf`` on an unquantised base."""
    from transformers import AutoConfig

    model_dir, path = Path(model_dir), Path(path)
    config = AutoConfig.from_pretrained(model_dir)
    architecture = check_architecture(getattr(config, "model_type", None), model_dir)
    rope = rope_settings(config, model_dir)
    state = read_state(model_dir)
    tokenizer = write_model(path, model_dir, config, architecture, rope, state, dtype, name or model_dir.name)
    diff = verify_model(path, config, architecture, state, dtype)
    return {"tensors": len(state), "max_abs_diff": diff, "tokenizer": tokenizer}


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    from lora_cli.adapters.tensor_files import load_safetensors

    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_safetensors(file))
    if not state:
        raise LoraCliError(f"the merged model in {folder} has no safetensors weights")
    return state


def tensor_plan(config: Any, architecture: str, state: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(transformers key, GGUF name) for every tensor of the merged model, in the state dict's order."""
    names = name_map(config, architecture)
    plan = []
    for key in state:
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise LoraCliError(f"the merged model's tensor {key} has no llama.cpp name; nothing written")
        plan.append((key, gname))
    return plan


def write_model(path: Path, merged_dir: Path, config: Any, architecture: str, rope: dict[str, Any],
                 state: dict[str, torch.Tensor], dtype: str, run_name: str) -> dict[str, Any]:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(run_name)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope["theta"])
    if rope["linear_factor"] is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["linear_factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_F16)
    tokenizer = add_tokenizer(writer, merged_dir, config.vocab_size)
    heads = rotary_heads(config)
    for key, gname in tensor_plan(config, architecture, state):
        tensor = to_rotary(state[key].float(), gname, heads)
        array = tensor.numpy().astype(DTYPES[dtype] if tensor.dim() > 1 else np.float32)
        writer.add_tensor(gname, array)
    finish(writer)
    return tokenizer


def add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> dict[str, Any]:
    """The tokenizer of the merged folder as llama.cpp's ``tokenizer.ggml.*`` keys and chat template.

    Tokens by id (ids no token holds become "[PAD<id>]", type UNUSED), added special tokens
    CONTROL, other added tokens USER_DEFINED, the rest NORMAL; merges, special token ids and the
    chat template through gguf's SpecialVocab; whether BOS / EOS are added is read from what
    the tokenizer does to a text."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")) \
        if (folder / "tokenizer.json").is_file() else {}
    pre = tokenizer_kind(tokenizer_json, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise LoraCliError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise LoraCliError(f"{folder / 'tokenizer.json'} holds no BPE merges; nothing written")
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    special.add_special_token["bos"] = start > 0 and full[0] == tok.bos_token_id
    special.add_special_token["eos"] = len(full) > start + len(plain) and full[-1] == tok.eos_token_id
    if special.chat_template is None and getattr(tok, "chat_template", None):
        special.chat_template = tok.chat_template
    special.add_to_gguf(writer, quiet=True)
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(special.merges),
            "special_token_ids": dict(special.special_token_ids), "add_bos": special.add_special_token["bos"],
            "add_eos": special.add_special_token["eos"], "chat_template": special.chat_template is not None}


def verify_model(path: Path, config: Any, architecture: str, state: dict[str, torch.Tensor], dtype: str) -> float:
    """Every GGUF tensor, rotary order undone, equals the merged weight (cast to the file's dtype)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    if field_value(reader, gguf.Keys.General.ARCHITECTURE) != architecture:
        raise GgufExportError("the GGUF file names another architecture than the one written; nothing written")
    tensors = {t.name: t for t in reader.tensors}
    plan = tensor_plan(config, architecture, state)
    if set(tensors) != {g for _, g in plan}:
        raise GgufExportError(f"the GGUF file holds {len(tensors)} tensors, not the {len(plan)} written; nothing written")
    heads = rotary_heads(config)
    worst = 0.0
    for key, gname in plan:
        want = state[key].float()
        stored = dtype if want.dim() > 1 else "float32"
        got = to_rotary(read_tensor(tensors[gname], stored), gname, heads, inverse=True)
        if got.shape != want.shape:
            raise GgufExportError(f"{gname} reads back as {tuple(got.shape)}, expected {tuple(want.shape)}; nothing written")
        diff = float((got - want.to(torch_dtype(stored)).float()).abs().max()) if want.numel() else 0.0
        if diff != 0.0:
            raise GgufExportError(f"{gname} reads back {diff:.3g} away from the merged weight {key}; nothing written")
        worst = max(worst, float((got - want).abs().max()) if want.numel() else 0.0)
    vocab = field_value(reader, gguf.Keys.Tokenizer.LIST)
    if vocab is None or len(vocab) != config.vocab_size:
        raise GgufExportError("the GGUF file's token list is not the tokenizer's; nothing written")
    return worst


# ---------------------------------------------------------------------------- small helpers
def finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def field_value(reader: Any, key: str) -> Any:
    found = reader.get_field(key)
    return None if found is None else found.contents()


def torch_dtype(dtype: str) -> torch.dtype:
    return torch.float16 if dtype == "float16" else torch.float32


def read_tensor(tensor: Any, dtype: str) -> torch.Tensor:
    """A GGUF tensor in numpy (PyTorch) order, as float32."""
    array = np.asarray(tensor.data)
    want = np.dtype(DTYPES[dtype])
    if array.dtype != want:
        raise GgufExportError(f"{tensor.name} is stored as {array.dtype}, expected {want}; nothing written")
    return torch.from_numpy(array.astype(np.float32).copy())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
