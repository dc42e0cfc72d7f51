"""Short real trainings for the export and push tests: the quickstart (digits, tiny ViT) and a
tiny BERT text classifier, both offline."""

from __future__ import annotations

from pathlib import Path

from lora_cli.training.pipeline import run_training
from tests.helpers_text import TINY_CONFIGS, make_tokenizer, sentiment_rows, write_csv, write_recipe

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def train_quickstart(root: Path, name: str = "quickstart") -> Path:
    """The shipped quickstart, two steps, 5 % of the digits held out (90 images)."""
    return run_training(QUICKSTART, [
        f"output_dir={root / name}", "training.max_steps=2", "training.eval_strategy=no", "training.save_strategy=no",
        "training.load_best_model_at_end=false", "training.logging_steps=1", "data.val_split=0.05",
    ])


def train_text_classifier(root: Path) -> Path:
    """A seq-cls run on a tiny BERT with a word-level tokenizer made on the spot."""
    folder = root / "cls"
    folder.mkdir(parents=True)
    tokenizer = make_tokenizer(folder / "tok", template="bert")
    write_csv(folder / "train.csv", sentiment_rows(48))
    return run_training(write_recipe(
        folder / "recipe.yaml", task="seq-cls", model={"config": TINY_CONFIGS["bert"], "tokenizer": str(tokenizer)},
        data={"train_file": str(folder / "train.csv"), "val_split": 0.25, "max_length": 16}))
