"""Small corpora and preprocess helpers the data-pipeline and loader tests share."""

from pathlib import Path

import numpy as np

from bigmodel_cli.data import manifest as manifest_lib
from bigmodel_cli.data import preprocess as pp
from bigmodel_cli.data.tokenizer import Tokenizer

WORDS = "the cat sat on a mat while two dogs ran past the old red barn and one bird sang".split()


def docs(n: int, seed: int = 0) -> list[str]:
    """n short English documents of 1-3 lines."""
    rng = np.random.default_rng(seed)
    return [
        "\n".join(" ".join(rng.choice(WORDS, rng.integers(3, 9))) for _ in range(rng.integers(1, 4))) for _ in range(n)
    ]


def make(tmp_path: Path, inputs, name="out", **kw) -> tuple[dict, Path]:
    kw.setdefault("model_type", "char")
    out = tmp_path / name
    return pp.run(pp.PreprocessConfig(inputs=tuple(inputs), out=out, **kw)), out


def all_tokens(out: Path, split: str) -> np.ndarray:
    manifest = manifest_lib.load_manifest(out)
    files = manifest_lib.split_files(manifest, split)
    return np.concatenate([np.fromfile(out / f["file"], dtype=manifest["dtype"]) for f in files])


def decoded_docs(out: Path) -> list[str]:
    """Both splits decoded and cut at EOS: the documents (order: train then val)."""
    tk = Tokenizer(out / "tokenizer.model")
    text = []
    for split in ("train", "val"):
        ids = all_tokens(out, split).tolist()
        cur: list[int] = []
        for t in ids:
            if t == tk.eos_id:
                text.append(tk.decode(cur))
                cur = []
            else:
                cur.append(t)
    return text
