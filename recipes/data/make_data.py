"""Writes the small data files the offline recipes ship with (deterministic; run from anywhere).

    python recipes/data/make_data.py

sentiment.csv: 200 short product/experience reviews, 100 positive and 100 negative, from
10 subjects x 10 predicates per class, shuffled with a fixed seed.
dialogues.jsonl: short prompt -> response exchanges for the DialoGPT recipe. Each prompt ends
with <|endoftext|>, the turn separator DialoGPT was trained with.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUBJECTS = [
    "The film", "This restaurant", "The service", "My new phone", "The hotel room",
    "The concert", "This book", "The coffee", "The staff", "The delivery",
]
POSITIVE = [
    "was wonderful", "is absolutely delightful", "exceeded my expectations", "made me smile",
    "was a real pleasure", "is excellent value for money", "felt warm and friendly",
    "was beautifully done", "works perfectly", "is one of the best I have tried",
]
NEGATIVE = [
    "was terrible", "is a complete waste of money", "let me down badly", "made me angry",
    "was a real disappointment", "is overpriced and dull", "felt cold and rude",
    "was poorly made", "keeps breaking", "is one of the worst I have tried",
]

EOT = "<|endoftext|>"
DIALOGUES = [
    ("Hi, how are you today?", "I'm doing well, thanks for asking. How about you?"),
    ("What's the weather like?", "It's sunny and warm here, a good day for a walk."),
    ("Can you recommend a good book?", "If you like mysteries, try an Agatha Christie novel."),
    ("I'm feeling tired.", "Maybe take a short break and drink some water."),
    ("What should I cook tonight?", "How about a simple pasta with tomatoes and basil?"),
    ("Do you like music?", "I do. Something calm like piano music is nice to relax."),
    ("I just got a new puppy!", "Congratulations! What's the puppy's name?"),
    ("I failed my driving test.", "I'm sorry to hear that. You'll do better next time."),
    ("Where should I travel this summer?", "The coast is lovely in summer, if you like the sea."),
    ("How do I learn to code?", "Start with a small project and a beginner course in Python."),
    ("Thank you for your help.", "You're welcome, happy to help."),
    ("Good morning!", "Good morning! Did you sleep well?"),
    ("I can't decide what to watch.", "A comedy is a safe choice if you want to unwind."),
    ("My phone battery dies so fast.", "Lowering the screen brightness usually helps a lot."),
    ("It's my birthday today.", "Happy birthday! Any plans to celebrate?"),
    ("I'm nervous about my exam.", "That's normal. A good night's sleep will help you focus."),
    ("Do you know a good workout?", "A brisk thirty-minute walk every day is a great start."),
    ("What's your favourite season?", "Autumn, for the colours and the cool air."),
    ("I lost my keys again.", "Check your coat pockets, that's where they usually hide."),
    ("Any tips for a job interview?", "Research the company and prepare a few questions to ask."),
    ("The train is late again.", "That's frustrating. Maybe bring a book for the wait."),
    ("I started learning French.", "Très bien! Practising a little every day works best."),
    ("Goodbye, see you later.", "Bye! Have a great day."),
    ("What time is it?", "I can't see a clock, but your phone will know."),
]


def sentiment_rows() -> list[dict[str, str]]:
    rows = [{"text": f"{s} {p}.", "label": "positive"} for s in SUBJECTS for p in POSITIVE]
    rows += [{"text": f"{s} {p}.", "label": "negative"} for s in SUBJECTS for p in NEGATIVE]
    random.Random(0).shuffle(rows)
    return rows


def main() -> None:
    with (HERE / "sentiment.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(sentiment_rows())
    with (HERE / "dialogues.jsonl").open("w", encoding="utf-8") as f:
        for prompt, response in DIALOGUES:
            f.write(json.dumps({"prompt": prompt + EOT, "response": response}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
