"""bigmodel against nanoGPT on nanoGPT's own Tiny Shakespeare split, on this machine, wall time included.

nanoGPT's data/shakespeare_char/prepare.py trains on the first 90% of the characters and validates on the
last 10%. Here bigmodel trains on exactly the first 90% (`preprocess --val-fraction 0`, recipes/
shakespeare_char.toml) and scores the whole last 10% with `evaluate --text`. nanoGPT runs its README's CPU
"baby" command exactly, from a local checkout (no download: its input.txt is the same file): its wall time is
the time to beat. Its saved model is then scored on the whole last 10% too, the way `evaluate --text` scores.

    python scripts/bench/shakespeare_vs_nanogpt.py --nanogpt PATH/TO/nanoGPT [--rounds N] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEXT = (
    Path(os.environ.get("BIGMODEL_SHARED_DATA", REPO.parent / "shared" / "data")) / "pretrain" / "tinyshakespeare.txt"
)
BABY = [  # nanoGPT README's CPU command, as it stands
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]


def timed(cmd: list, cwd: Path | None = None) -> tuple[float, str, float]:
    """(wall seconds, output, peak RSS in MB) of one command: the peak is wait4's ru_maxrss of that process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd, stdout=output, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        output.seek(0)
        text = output.read()
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{text[-3000:]}")
    return seconds, text, round(usage.ru_maxrss * 1024 / 1e6, 1)


def bigmodel(work: Path) -> dict:
    text = TEXT.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)  # nanoGPT's split, in characters
    (work / "train.txt").write_text(text[:cut], encoding="utf-8")
    (work / "val.txt").write_text(text[cut:], encoding="utf-8")
    exe = [sys.executable, "-m", "bigmodel_cli"]
    # nanoGPT's vocabulary is the text's 65 characters: no byte-fallback ids either (the first 90% holds
    # every character of the last 10%, so nothing maps to <unk>).
    prep, _, _ = timed([*exe, "preprocess", work / "train.txt", "--out", work / "data", "--model-type", "char",
                     "--val-fraction", "0", "--no-byte-fallback"])  # fmt: skip
    train, _, rss = timed([*exe, "pretrain", REPO / "recipes" / "shakespeare_char.toml", "--run-dir", work / "run",
                      "--set", f"data.path={work / 'data'}", "--set", "train.eval_every=0"])  # fmt: skip
    _, out, _ = timed([*exe, "evaluate", work / "run", "--text", work / "val.txt", "--json"])
    metrics = json.loads(out.strip().splitlines()[-1])
    return {"val_loss": metrics["loss"], "bits_per_byte": metrics["bits_per_byte"], "train_s": train,
            "train_peak_rss_mb": rss, "prep_s": prep}  # fmt: skip


def nanogpt(checkout: Path, work: Path) -> dict:
    repo = work / "nanoGPT"
    shutil.copytree(checkout, repo, ignore=shutil.ignore_patterns(".git"))
    data = repo / "data" / "shakespeare_char"
    shutil.copyfile(TEXT, data / "input.txt")  # prepare.py downloads only when input.txt is missing
    prep, _, _ = timed([sys.executable, "prepare.py"], cwd=data)
    train, out, rss = timed([sys.executable, "train.py", "config/train_shakespeare_char.py", *BABY], cwd=repo)
    final = re.findall(r"step 2000: train loss ([\d.]+), val loss ([\d.]+)", out)
    if not final:
        sys.exit(f"no step-2000 evaluation in nanoGPT's output:\n{out[-2000:]}")
    _, whole, _ = timed([sys.executable, "-c", WHOLE_VAL], cwd=repo)
    return {"val_loss": float(final[-1][1]), "val_loss_whole": float(whole.split()[-1]), "train_s": train,
            "train_peak_rss_mb": rss, "prep_s": prep}  # fmt: skip


# nanoGPT's saved model scored like `evaluate --text`: consecutive 64-character windows over all of val.bin,
# every character after the first predicted once (its own estimate above samples 200 random batches).
WHOLE_VAL = """
import numpy as np, torch
from model import GPT, GPTConfig
ckpt = torch.load("out-shakespeare-char/ckpt.pt", map_location="cpu")
model = GPT(GPTConfig(**ckpt["model_args"]))
model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
model.eval()
ids = torch.from_numpy(np.fromfile("data/shakespeare_char/val.bin", dtype=np.uint16).astype(np.int64))
T, total, count = 64, 0.0, 0
with torch.no_grad():
    for start in range(0, len(ids) - 1, T):
        x, y = ids[start : start + T], ids[start + 1 : start + T + 1]
        x = x[: len(y)]
        logits, _ = model(x[None], y[None])
        total += torch.nn.functional.cross_entropy(logits[0], y, reduction="sum").item()
        count += len(y)
print(total / count)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--work", type=Path, default=Path("/tmp/shakespeare-bench"))
    parser.add_argument("--only", choices=("bigmodel", "nanogpt"), default=None)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each, alternating which goes first")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    sides = [side for side in ("bigmodel", "nanoGPT") if args.only in (None, side.lower())]
    rounds = []
    for number in range(args.rounds):
        # A host's speed can drift over minutes: alternating the order shares the drift between the two.
        order = sides if number % 2 == 0 else sides[::-1]
        work = args.work / f"round{number + 1}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        result = {}
        for side in order:
            result[side] = bigmodel(work) if side == "bigmodel" else nanogpt(args.nanogpt, work)
        rounds.append(result)
        print(f"round {number + 1}: " + " | ".join(_line(side, result[side]) for side in sides), flush=True)
    sys.path.insert(0, str(REPO))
    from bigmodel_cli.utils import host_line

    summary = {side: _spread([r[side] for r in rounds]) for side in sides}
    print(json.dumps({"host": host_line(), "rounds": rounds, "summary": summary}, indent=2))


def _line(side: str, result: dict) -> str:
    loss = result.get("val_loss_whole", result["val_loss"])
    return f"{side} {loss:.4f} in {result['train_s']:.1f} s, {result['train_peak_rss_mb']:.0f} MB"


def _spread(results: list[dict]) -> dict:
    """min, median and max over the rounds of each figure."""
    keys = [key for key in results[0] if isinstance(results[0][key], float)]
    spread = {}
    for key in keys:
        values = [r[key] for r in results]
        spread[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    return spread


if __name__ == "__main__":
    main()
