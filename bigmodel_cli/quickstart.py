"""`bigmodel quickstart`: preprocess -> pretrain -> evaluate -> generate on a corpus the package writes itself."""

from __future__ import annotations

import random
from pathlib import Path

from bigmodel_cli import config as config_lib
from bigmodel_cli import pretrain
from bigmodel_cli.console import Console
from bigmodel_cli.data import preprocess
from bigmodel_cli.errors import UserError
from bigmodel_cli.evaluate import generate, lm

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
ANIMALS = "cat dog fox owl hen bee ant cow pig rat yak elk".split()
COLOURS = "red blue green brown black white grey gold".split()
PLACES = "garden river forest village meadow market castle harbour".split()
VERBS = "sees follows greets chases finds helps watches meets".split()
PROMPT = "count to seven:"  # what the quickstart's model continues at the end


def corpus(n_lines: int = 6000, seed: int = 0) -> str:
    """Small English made by rules (arithmetic, little stories) whose patterns a tiny model can learn fast."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randrange(7), rng.randrange(6)
            lines.append(f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
        elif kind == 1:
            x, y = rng.sample(ANIMALS, 2)
            lines.append(f"the {rng.choice(COLOURS)} {x} {rng.choice(VERBS)} the {y} in the {rng.choice(PLACES)}.")
        else:
            n = rng.randrange(2, 10)
            lines.append(f"count to {NUMBERS[n]}: " + " ".join(NUMBERS[1 : n + 1]) + ".")
    return "\n".join(lines) + "\n"


RECIPE = {
    "model": {"preset": "tiny", "max_seq_len": 128},
    "optim": {"lr": 3e-3, "warmup_steps": 20, "min_lr_ratio": 0.1},
    "train": {"batch_size": 16, "log_every": 25, "eval_every": 100, "eval_batches": 8},
    "checkpoint": {"every": 100, "keep": 1},
}


def run(out: Path, *, steps: int = 300, console: Console | None = None) -> dict:
    """Run the whole pipeline in `out` (which must not exist yet, so nothing of the user's is touched)."""
    console = console or Console()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists: pass --out NEW_DIR (or delete it to run the quickstart again)")
    out.mkdir(parents=True, exist_ok=True)
    text_file = out / "corpus.txt"
    text_file.write_text(corpus(), encoding="utf-8")

    console.info(f"1/4 preprocess: {text_file} -> {out / 'data'} (character tokenizer)")
    manifest = preprocess.run(
        preprocess.PreprocessConfig(inputs=(text_file,), out=out / "data", model_type="char", val_fraction=0.1)
    )
    entropy = manifest["unigram_entropy"]
    console.info(f"    unigram entropy of the corpus: {entropy:.3f} nats/char (a model that learns goes far below)")

    console.info(f"2/4 pretrain: {steps} steps of a tiny Llama-style model -> {out / 'run'}")
    raw = {**RECIPE, "data": {"path": str((out / "data").resolve())}, "train": {**RECIPE["train"], "steps": steps}}
    cfg = config_lib.build_config(raw, {}, config_lib.Config, out)
    result = pretrain.run(cfg, out / "run", console=console)

    console.info("3/4 evaluate")
    metrics = lm.run(out / "run")
    console.info(
        f"    validation loss {metrics['loss']:.3f} nats/char (unigram entropy {entropy:.3f}), "
        f"perplexity {metrics['perplexity']:.2f}"
    )
    # Counting is a pattern 300 steps learn for every n; the sums of the arithmetic lines take longer (a greedy
    # "three plus four is" gave "five." and "six." at 300-600 steps).
    console.info(f"4/4 generate (greedy) from {PROMPT!r}")
    sample = generate.run(out / "run", PROMPT, max_new_tokens=60, temperature=0.0)
    console.info("    " + sample.replace("\n", "\n    "))
    console.info(
        f"next: bigmodel generate {out / 'run'} --prompt 'the red fox' | bigmodel export {out / 'run'} "
        f"--out {out / 'export'}"
    )
    return {"val_loss": metrics["loss"], "unigram_entropy": entropy, "train": result}
