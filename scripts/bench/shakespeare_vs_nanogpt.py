"""bigmodel against nanoGPT on nanoGPT's own Tiny Shakespeare split, on this machine, wall time included.

nanoGPT's data/shakespeare_char/prepare.py trains on the first 90% of the characters and validates on the
last 10%. Here bigmodel trains on exactly the first 90% (`preprocess --val-fraction 0`, recipes/
shakespeare_char.toml) and scores the whole last 10% with `evaluate --text`. nanoGPT runs its README's CPU
"baby" command exactly, from a local checkout (no download: its input.txt is the same file): its wall time is
the time to beat. Its saved model is then scored on the whole last 10% too, the way `evaluate --text` scores.

    python scripts/bench/shakespeare_vs_nanogpt.py --nanogpt PATH/TO/nanoGPT [--work /tmp/shakespeare-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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
    args = parser.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    results = {}
    if args.only in (None, "bigmodel"):
        results["bigmodel"] = bigmodel(args.work)
    if args.only in (None, "nanogpt"):
        results["nanoGPT"] = nanogpt(args.nanogpt, args.work)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
