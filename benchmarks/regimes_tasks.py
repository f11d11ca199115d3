"""The tasks of benchmarks/regimes.py: generated here, offline, deterministic per seed, held-out never in training.

Each task gives `make(n_train, n_test, seed) -> (train, test)`, rows {"instruction", "response", "answer"}, and a
grader of a greedy answer against `answer`. They are meant to span the base model's prior on the targets:

- codeword   (weak prior):  is the animal a mammal, answered with made-up code words (zib / zab) the prompt never
                            names; the knowledge is there, the target tokens are improbable.
- sentiment  (prior right, uncalibrated): two-clause reviews, half of them contrasting ("..., but ..."), where the
                            clause after "but" decides; one word good / bad.
- arithmetic (the replicate task): multi-step word problems with worked solutions ending in \\boxed{} (reasoning_task).
- capitals   (knowledge it partly knows): the capital city of a country, the city's name only.
"""

from __future__ import annotations

import random
import re

from asft.cli.quickstart import SUBJECTS as QUICKSTART_SUBJECTS
from reasoning_task import INSTRUCTION as MATH_INSTRUCTION
from reasoning_task import make_split

MAMMALS = (
    "dog cat horse cow pig sheep goat rabbit mouse rat lion tiger bear wolf fox deer elephant giraffe zebra monkey "
    "gorilla whale dolphin bat squirrel camel kangaroo koala hippo rhino otter beaver hamster donkey moose leopard "
    "cheetah panda seal walrus"
).split()
NON_MAMMALS = (
    "eagle sparrow parrot owl penguin chicken duck swan crow pigeon shark salmon trout tuna goldfish snake lizard "
    "turtle crocodile frog toad ant bee butterfly spider beetle fly mosquito octopus squid crab lobster snail worm "
    "jellyfish starfish flamingo ostrich peacock"
).split()
CODE = {True: "zib", False: "zab"}
CODEWORD_PROMPT = "Is a {animal} a mammal? Answer with the code word only."

POSITIVE = "delicious friendly wonderful excellent cozy fresh lovely perfect amazing pleasant generous spotless".split()
NEGATIVE = "bland rude awful terrible cramped stale dirty slow overpriced noisy cold greasy".split()
SUBJECTS = QUICKSTART_SUBJECTS[:12]  # the quickstart's review subjects (its first twelve)
SENTIMENT_PROMPT = (
    "Classify the overall sentiment of this review as good or bad. Answer with one word.\n\nReview: {review}"
)

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Ireland": "Dublin",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Switzerland": "Bern",
    "Czech Republic": "Prague",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Ukraine": "Kyiv",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh",
    "India": "New Delhi",
    "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "Malaysia": "Kuala Lumpur",
    "South Korea": "Seoul",
    "Mongolia": "Ulaanbaatar",
    "Nepal": "Kathmandu",
    "Afghanistan": "Kabul",
    "Kenya": "Nairobi",
    "Ethiopia": "Addis Ababa",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Morocco": "Rabat",
    "Algeria": "Algiers",
    "Tunisia": "Tunis",
    "Senegal": "Dakar",
    "Uganda": "Kampala",
    "Zimbabwe": "Harare",
    "Angola": "Luanda",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Cuba": "Havana",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Argentina": "Buenos Aires",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Ecuador": "Quito",
    "Uruguay": "Montevideo",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Iceland": "Reykjavik",
    "Latvia": "Riga",
    "Lithuania": "Vilnius",
    "Estonia": "Tallinn",
    "Slovakia": "Bratislava",
    "Qatar": "Doha",
}
CAPITAL_PROMPT = "What is the capital city of {country}? Answer with the city's name only."


def _split(items: list, n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    """A seeded shuffle of distinct items: the first n_test are held out, the next n_train train."""
    items = list(items)
    random.Random(seed).shuffle(items)
    if n_train + n_test > len(items):
        n_train = len(items) - n_test
    return items[n_test : n_test + n_train], items[:n_test]


def codeword(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    animals = [(a, True) for a in MAMMALS] + [(a, False) for a in NON_MAMMALS]
    train, test = _split(animals, n_train, n_test, seed)

    def row(a, mammal):
        return {"instruction": CODEWORD_PROMPT.format(animal=a), "response": CODE[mammal], "answer": CODE[mammal]}

    return [row(*x) for x in train], [row(*x) for x in test]


def _review(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(SUBJECTS, 2)
    label = rng.choice(("good", "bad"))
    last = rng.choice(POSITIVE if label == "good" else NEGATIVE)
    if rng.random() < 0.5:  # contrasting clauses: the one after "but" decides
        first = rng.choice(NEGATIVE if label == "good" else POSITIVE)
        return f"{a} was {first}, but {b.lower()} was {last}.", label
    first = rng.choice([w for w in (POSITIVE if label == "good" else NEGATIVE) if w != last])
    return f"{a} was {first} and {b.lower()} was {last}.", label


def sentiment(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n_train + n_test:
        review, label = _review(rng)
        if review not in seen:
            seen.add(review)
            rows.append({"instruction": SENTIMENT_PROMPT.format(review=review), "response": label, "answer": label})
    return rows[n_test:], rows[:n_test]


def arithmetic(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    train, test = make_split(n_train, n_test, seed)

    def row(q, s, a):
        return {"instruction": f"{q}\n{MATH_INSTRUCTION}", "response": s, "answer": str(a)}

    return [row(*p) for p in train], [row(*p) for p in test]


def capitals(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    train, test = _split(sorted(CAPITALS.items()), n_train, n_test, seed)

    def row(country, city):
        return {"instruction": CAPITAL_PROMPT.format(country=country), "response": city, "answer": city}

    return [row(*x) for x in train], [row(*x) for x in test]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.strip().lower()).strip()


def grade_exact(generated: str, answer: str) -> bool:
    """The answer, alone (case, punctuation and surrounding space aside) on the first line."""
    lines = generated.strip().splitlines()
    return bool(lines) and _norm(lines[0]) == _norm(answer)


def grade_boxed(generated: str, answer: str) -> bool:
    """The last \\boxed{...} holds the answer's number."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", generated)
    return bool(boxed) and boxed[-1].strip().replace(",", "") == answer


# name -> (generator, grader, max_new_tokens for the held-out greedy answers)
TASKS = {
    "codeword": (codeword, grade_exact, 8),
    "sentiment": (sentiment, grade_exact, 8),
    "arithmetic": (arithmetic, grade_boxed, 128),
    "capitals": (capitals, grade_exact, 12),
}
