"""``python -m bench.real_guide MODEL DATA OUT``: the seed guide's own pipeline, as a user writes it
without loracli, on a local backbone folder and an image folder (train/ and validation/ class folders).

``datasets``' imagefolder loader, ``set_transform`` with torchvision transforms (resize to
``--size``, tensor, the processor's mean and std), ``AutoModelForImageClassification`` with a
new head, ``peft.get_peft_model`` with LoRA on the attention's query and value projections and
the head trained in full, the transformers ``Trainer``. Writes OUT/result.json: held-out
accuracy, trainable parameters, training images/s and the process's peak RSS. bench.real runs
it beside loracli's LoRA with the same settings.
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.real_guide", description=__doc__)
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--rate", type=float, default=5e-4)
    args = parser.parse_args(argv)

    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from torchvision import transforms
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(args.seed)
    dataset = load_dataset("imagefolder", data_dir=args.data)
    labels = dataset["train"].features["label"].names
    processor = AutoImageProcessor.from_pretrained(args.model)
    transform = transforms.Compose([
        transforms.Resize((args.size, args.size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=processor.image_mean, std=processor.image_std),
    ])

    def preprocess(batch):
        batch["pixel_values"] = [transform(image.convert("RGB")) for image in batch["image"]]
        return batch

    for split in dataset.values():
        split.set_transform(preprocess)

    def collate(rows):
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                "labels": torch.tensor([r["label"] for r in rows])}

    model = AutoModelForImageClassification.from_pretrained(
        args.model, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=["q_proj", "v_proj"],
                        modules_to_save=["classifier"])
    model = get_peft_model(model, config)
    trainable, _ = model.get_nb_trainable_parameters()
    training = TrainingArguments(
        output_dir=str(Path(args.out) / "checkpoints"), learning_rate=args.rate, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch, per_device_eval_batch_size=128, warmup_steps=5, weight_decay=0.0,
        eval_strategy="no", save_strategy="no", logging_steps=10, remove_unused_columns=False,
        dataloader_pin_memory=False, report_to="none", seed=args.seed, label_names=["labels"])
    trainer = Trainer(model=model, args=training, train_dataset=dataset["train"], data_collator=collate)
    stats = trainer.train().metrics
    predictions = trainer.predict(dataset["validation"])
    accuracy = float((np.argmax(predictions.predictions, axis=1) == predictions.label_ids).mean())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "result.json").write_text(json.dumps({
        "accuracy": accuracy, "trainable": int(trainable), "images_per_s": stats.get("train_samples_per_second"),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }, indent=2))
    print(f"accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
