#!/usr/bin/env python3
"""Write a learnable extractive-QA task in SQuAD v1.1 format, plus a pretraining corpus of the same world.

    python scripts/make_synthetic_qa.py --out data/synqa --seed 0 --n-train 2000 --n-test 200

writes
    train.json, test.json   SQuAD v1.1 JSON: short paragraphs of facts ("The fox lives in the forest. The red
                            cup belongs to Anna. ..."), one question each ("Where does the fox live?" ->
                            "forest"); the test paragraphs are new combinations, never seen in train.json
    corpus.txt              pretraining text, one paragraph a line: other paragraphs of facts, each followed by
                            every fact's question and the sentence that answers it, so a tiny model learns the
                            words and to look facts up, but never sees the finetuning format ("Answer:")

A tiny model pretrained on corpus.txt and then finetuned with `--task qa` on train.json should gain at least
20 F1 on test.json over the same model without finetuning (docs/finetuning.md has the commands; we measured
F1 ~2 -> ~35 with the tiny preset). Deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ANIMALS = "fox owl cat dog hen bee cow pig rat yak elk goat wolf bear deer frog".split()
PLACES = "forest river garden meadow village castle harbour market desert valley island cave".split()
COLOURS = "red blue green brown black white grey yellow".split()
OBJECTS = "cup hat box book lamp coat ring bell kite drum".split()
NAMES = "Anna Ben Clara David Emma Felix Grace Henry Ida Jack Kate Leo Mia Noah Olga Paul".split()
FOODS = "apples bread cheese plums rice soup carrots honey fish beans".split()
CITIES = "Paris Rome Oslo Lima Cairo Tokyo Dublin Madrid Vienna Prague".split()
GAMES = "chess tennis football cards golf hockey poker rugby".split()


def _facts(rng: random.Random) -> list[tuple[str, str, str]]:
    """Two to four facts, at most one per relation: (sentence, question, answer); the answer ends the sentence."""
    # One fact per relation keeps the task within reach of a tiny model: the question's relation finds the
    # sentence, whose last word is the answer. The answer still has to be read: it is random per paragraph.
    animal, names = rng.choice(ANIMALS), rng.sample(NAMES, 3)
    colour, thing = rng.choice(COLOURS), rng.choice(OBJECTS)
    place, food, city, game = rng.choice(PLACES), rng.choice(FOODS), rng.choice(CITIES), rng.choice(GAMES)
    facts = [
        (f"The {animal} lives in the {place}.", f"Where does the {animal} live?", place),
        (f"The {colour} {thing} belongs to {names[0]}.", f"Who owns the {colour} {thing}?", names[0]),
        (f"{names[1]} likes to eat {food}.", f"What does {names[1]} like to eat?", food),
        (f"{names[2]} works in {city}.", f"Where does {names[2]} work?", city),
        (f"{names[0]} plays {game}.", f"What does {names[0]} play?", game),
    ]
    return rng.sample(facts, rng.randint(2, 4))


def paragraph(rng: random.Random) -> tuple[str, str, str, int]:
    """(context, question, answer, answer_start) for one random paragraph and one of its facts."""
    facts = _facts(rng)
    asked = rng.randrange(len(facts))
    context, start = "", 0
    for i, (sentence, _, answer) in enumerate(facts):
        if i == asked:
            # The answer is the last word of its sentence, before the full stop.
            start = len(context) + sentence.rindex(answer)
        context += sentence + " "
    _, question, answer = facts[asked]
    return context.strip(), question, answer, start


def squad_file(rng: random.Random, n: int, split: str, avoid: set[str]) -> dict:
    """n questions, each on its own paragraph whose context is not in `avoid` (which it extends)."""
    paragraphs = []
    while len(paragraphs) < n:
        context, question, answer, start = paragraph(rng)
        if context in avoid:
            continue
        avoid.add(context)
        qid = f"{split}-{len(paragraphs)}"
        qa = {"id": qid, "question": question, "answers": [{"text": answer, "answer_start": start}]}
        paragraphs.append({"context": context, "qas": [qa]})
    return {"version": "1.1", "data": [{"title": f"synthetic {split}", "paragraphs": paragraphs}]}


def corpus(rng: random.Random, n: int, avoid: set[str]) -> str:
    """Paragraphs of facts, each followed by every fact's question and the sentence that answers it."""
    # Looking facts up is most of what a tiny model must learn here, so most of the text asks for it.
    lines = []
    while len(lines) < n:
        facts = _facts(rng)
        context = " ".join(f for f, _, _ in facts)
        if context in avoid:  # keep the held-out paragraphs out of pretraining too
            continue
        asked = " ".join(f"{question} {sentence}" for sentence, question, _ in rng.sample(facts, len(facts)))
        lines.append(f"{context} {asked}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--n-train", type=int, default=2000, help="training questions (one paragraph each)")
    parser.add_argument("--n-test", type=int, default=200, help="held-out questions on new paragraphs")
    parser.add_argument("--n-corpus", type=int, default=20000, help="paragraphs of pretraining text")
    args = parser.parse_args(argv)
    if min(args.n_train, args.n_test, args.n_corpus) < 1:
        parser.error("--n-train, --n-test and --n-corpus must be positive")
    # One random stream per file, so that e.g. a larger --n-train leaves test.json unchanged.
    seen: set[str] = set()
    test = squad_file(random.Random(f"{args.seed}:test"), args.n_test, "test", seen)
    train = squad_file(random.Random(f"{args.seed}:train"), args.n_train, "train", seen)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps(train, indent=1) + "\n", encoding="utf-8")
    (args.out / "test.json").write_text(json.dumps(test, indent=1) + "\n", encoding="utf-8")
    (args.out / "corpus.txt").write_text(
        corpus(random.Random(f"{args.seed}:corpus"), args.n_corpus, seen), encoding="utf-8"
    )
    print(
        f"wrote {args.out}/train.json ({args.n_train} questions), test.json ({args.n_test}), "
        f"corpus.txt ({args.n_corpus} paragraphs)"
    )


if __name__ == "__main__":
    main()
