"""Writes the small data files the offline recipes ship with (deterministic; run from anywhere).

    python recipes/data/make_data.py

sentiment.csv: 200 short product/experience reviews, 100 positive and 100 negative, from
10 subjects x 10 predicates per class, shuffled with a fixed seed.
dialogues.jsonl: short prompt -> response exchanges for the DialoGPT recipe. Each prompt ends
with <|endoftext|>, the turn separator DialoGPT was trained with.
chat.jsonl: 140 conversations in OpenAI's messages format (role/content) for the SmolLM2 chat
recipe and bench.trl: one to three exchanges each, some with a system prompt; a concise tutor
answering geography, science, unit and arithmetic questions in one or two sentences.
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


CAPITALS = [
    ("France", "Paris", "French"), ("Spain", "Madrid", "Spanish"), ("Italy", "Rome", "Italian"),
    ("Germany", "Berlin", "German"), ("Portugal", "Lisbon", "Portuguese"), ("Poland", "Warsaw", "Polish"),
    ("Greece", "Athens", "Greek"), ("Sweden", "Stockholm", "Swedish"), ("Norway", "Oslo", "Norwegian"),
    ("Finland", "Helsinki", "Finnish"), ("Japan", "Tokyo", "Japanese"), ("Egypt", "Cairo", "Arabic"),
    ("Kenya", "Nairobi", "Swahili and English"), ("Peru", "Lima", "Spanish"), ("Canada", "Ottawa", "English and French"),
    ("Australia", "Canberra", "English"), ("Austria", "Vienna", "German"), ("Hungary", "Budapest", "Hungarian"),
    ("Ireland", "Dublin", "English and Irish"), ("Turkey", "Ankara", "Turkish"), ("Chile", "Santiago", "Spanish"),
    ("Thailand", "Bangkok", "Thai"), ("Vietnam", "Hanoi", "Vietnamese"), ("Argentina", "Buenos Aires", "Spanish"),
    ("Morocco", "Rabat", "Arabic and Berber"), ("Denmark", "Copenhagen", "Danish"), ("Mexico", "Mexico City", "Spanish"),
    ("Brazil", "Brasilia", "Portuguese"), ("Netherlands", "Amsterdam", "Dutch"), ("Czechia", "Prague", "Czech"),
]
SCIENCE = [
    ("What is photosynthesis?", "Photosynthesis is how plants turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red light, so the sky looks blue."),
    ("What is gravity?", "Gravity is the pull that masses exert on each other; it keeps us on the ground."),
    ("How many planets are in the solar system?", "There are eight planets in the solar system."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("What is DNA?", "DNA is the molecule that carries the genetic instructions of living things."),
    ("Which planet is the largest?", "Jupiter is the largest planet in the solar system."),
    ("What gas do we breathe out?", "We breathe out carbon dioxide."),
    ("What is the speed of light?", "Light travels at about 300,000 kilometres per second."),
    ("What is an atom?", "An atom is the smallest unit of a chemical element, a nucleus with electrons around it."),
    ("Why do we have seasons?", "Earth's axis is tilted, so each hemisphere gets more or less sunlight over the year."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("How many bones does an adult have?", "An adult human has 206 bones."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("What causes tides?", "Tides are caused mainly by the Moon's gravity pulling on the oceans."),
    ("What is the largest ocean?", "The Pacific is the largest ocean on Earth."),
    ("What is the tallest mountain?", "Mount Everest is the tallest mountain above sea level, at about 8,849 metres."),
    ("What is the longest river?", "The Nile and the Amazon are the longest rivers, each about 6,600 to 7,000 kilometres."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("What is a mammal?", "A mammal is a warm-blooded animal with hair that feeds its young with milk."),
]
FOLLOW_UPS = [
    ("Can you say that more simply?", "In short: {short}"),
    ("Thanks! Is that always true?", "It is the usual answer; details can vary, but {short}"),
]
SYSTEMS = [
    "You are a concise tutor. Answer in one or two sentences.",
    "You are a helpful assistant who gives short, clear answers.",
]


def _short(answer: str) -> str:
    return answer[0].lower() + answer[1:]


def chat_rows() -> list[dict]:
    """Conversations: capitals with a language follow-up, science questions (some with a follow-up),
    unit conversions and products; a system prompt on every third row."""
    rng = random.Random(0)
    rows = []
    for i, (country, capital, language) in enumerate(CAPITALS):
        turns = [("user", f"What is the capital of {country}?"), ("assistant", f"The capital of {country} is {capital}.")]
        if i % 2 == 0:
            turns += [("user", "And what language do people speak there?"),
                      ("assistant", f"In {country}, people mainly speak {language}.")]
        rows.append(turns)
        rows.append([("user", f"Which country has {capital} as its capital?"),
                     ("assistant", f"{capital} is the capital of {country}.")])
    for i, (question, answer) in enumerate(SCIENCE):
        rows.append([("user", question), ("assistant", answer)])
        ask, reply = FOLLOW_UPS[i % len(FOLLOW_UPS)]
        rows.append([("user", question), ("assistant", answer), ("user", ask), ("assistant", reply.format(short=_short(answer)))])
    for km in (3, 5, 8, 10, 12, 15, 21, 42):
        rows.append([("user", f"How many miles is {km} kilometres?"),
                     ("assistant", f"{km} kilometres is about {km * 0.621371:.1f} miles.")])
    for celsius in (-10, 0, 15, 20, 25, 30, 37, 100):
        rows.append([("user", f"What is {celsius} degrees Celsius in Fahrenheit?"),
                     ("assistant", f"{celsius} degrees Celsius is {celsius * 9 / 5 + 32:g} degrees Fahrenheit.")])
    pairs = [(a, b) for a in range(3, 13) for b in (4, 7, 9)]
    rng.shuffle(pairs)
    for a, b in pairs[:24]:
        turns = [("user", f"What is {a} times {b}?"), ("assistant", f"{a} times {b} is {a * b}.")]
        if a % 3 == 0:
            turns += [("user", f"And {a} plus {b}?"), ("assistant", f"{a} plus {b} is {a + b}.")]
        rows.append(turns)
    rng.shuffle(rows)
    out = []
    for i, turns in enumerate(rows):
        messages = [{"role": role, "content": text} for role, text in turns]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEMS[(i // 3) % len(SYSTEMS)]})
        out.append({"messages": messages})
    return out


def main() -> None:
    with (HERE / "sentiment.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(sentiment_rows())
    with (HERE / "dialogues.jsonl").open("w", encoding="utf-8") as f:
        for prompt, response in DIALOGUES:
            f.write(json.dumps({"prompt": prompt + EOT, "response": response}, ensure_ascii=False) + "\n")
    with (HERE / "chat.jsonl").open("w", encoding="utf-8") as f:
        for row in chat_rows():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
