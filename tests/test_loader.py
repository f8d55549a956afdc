"""The loader on small data made here: packing with segment ids, weighted mixtures over one tokenizer, the
resumable batch order, and array batches that keep every row once."""

import json

import numpy as np
import pytest

from bigmodel_cli.data import loader, mixture
from bigmodel_cli.data.tokenizer import Tokenizer
from bigmodel_cli.errors import UserError
from tests.data_helpers import docs, make


def test_packing_segment_ids_and_positions_at_document_boundaries(tmp_path):
    texts = ["aaa", "bb", "cccc", "d", "eeeee"] * 6
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    manifest, out = make(tmp_path, [tmp_path / "p.jsonl"], pack_documents=True, val_fraction=0.5)
    windows = loader.TokenWindows(out, "train", manifest, 12)
    tk = Tokenizer(out / "tokenizer.model")
    # Train holds documents 1, 3, 5, ... (val takes every other one): bb E d E aaa E cccc E eeeee E ...
    batch = loader.batch_of(windows, [0])
    pieces = [tk.sp.id_to_piece(int(t)) for t in batch["inputs"][0]]
    assert "".join(p if p != "</s>" else "|" for p in pieces) == "bb|d|aaa|ccc"
    assert batch["segment_ids"][0].tolist() == [1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4]
    assert batch["positions"][0].tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3]
    assert batch["segment_ids"].dtype == batch["positions"].dtype == np.int32
    # A window starting inside a document numbers it 1 and counts its positions from 0.
    seg, pos = windows.segments(1)
    assert seg[0] == 1 and pos[0] == 0
    plain, out2 = make(tmp_path, [tmp_path / "p.jsonl"], name="plain", val_fraction=0.5)
    assert set(loader.batch_of(loader.TokenWindows(out2, "train", plain, 12), [0])) == {"inputs", "targets", "weights"}


def test_mixture_weights_and_shared_tokenizer(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs(300, seed=1)) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d.upper()}) for d in docs(100, seed=2)) + "\n")
    _, a = make(tmp_path, [tmp_path / "a.jsonl", tmp_path / "b.jsonl"], name="a")  # one tokenizer for both
    _, b = make(tmp_path, [tmp_path / "b.jsonl"], name="b", tokenizer=a / "tokenizer.model", pack_documents=True)
    mix = loader.open_mixture(loader.load_mixture(f"{a}:0.75, {b}:0.25"), "train", 16)
    batches = loader.TrainBatches(mix, 8, seed=0)
    keys = [k for step in range(200) for k in batches.indices(step)]
    share_b = sum(part == 1 for part, _ in keys) / len(keys)
    assert abs(share_b - 0.25) < 0.01
    assert len({k for k in keys if k[0] == 1}) == mix.parts[1].count  # b cycles through all its windows
    batch = batches(3)
    assert batch["inputs"].shape == (8, 16) and "segment_ids" in batch  # one packed part: all rows carry them
    val = loader.open_mixture(loader.load_mixture(f"{a}:3,{b}:1"), "val", 16)
    assert len(list(loader.eval_batches(val, 4, 100))) == -(-val.count // 4)
    _, c = make(tmp_path, [tmp_path / "b.jsonl"], name="c")  # its own tokenizer
    with pytest.raises(UserError, match="different tokenizer"):
        loader.load_mixture(f"{a}:1,{c}:1")
    with pytest.raises(UserError, match="data.mixture: 2 data sets but 1 weights"):
        loader.Mixture(mix.parts, [1.0])
    assert mixture.resolve_mixture("x:3, /abs/y:1", tmp_path) == f"{tmp_path / 'x'}:3,/abs/y:1"
    # Each cycle of the order holds the weights' integer proportions, rounded: 0.81:0.19 is 426:100 (Grain's own
    # truncation made it 426:99, as 0.19 * 100 / 0.19 = 99.99999999999999).
    skewed = loader.Mixture(mix.parts, [0.81, 0.19])
    cycle = [part for part, _ in (skewed.order(0)[i] for i in range(526 * 3))]
    assert cycle.count(1) == 300
    for bad in ("", f"{a}", f"{a}:0", f"{a}:x"):
        with pytest.raises(UserError, match="data.mixture"):
            loader.parse_mixture(bad)


def test_resuming_at_step_k_gives_the_batches_of_an_uninterrupted_run(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs(300)) + "\n")
    manifest, out = make(tmp_path, [tmp_path / "c.jsonl"], pack_documents=True)
    windows = loader.TokenWindows(out, "train", manifest, 32)
    steps = 3 * windows.count // 4  # crosses two epoch boundaries at batch size 4
    full = [b for _, b in loader.prefetch(loader.TrainBatches(windows, 4, seed=5), range(steps))]
    k = steps // 2 + 1
    resumed = loader.prefetch(
        loader.TrainBatches(loader.TokenWindows(out, "train", manifest, 32), 4, seed=5), range(k, steps)
    )
    for step, batch in resumed:
        for name in full[step]:
            np.testing.assert_array_equal(batch[name], full[step][name])
    again = loader.TrainBatches(windows, 4, seed=5)
    one_epoch = [i for s in range(windows.count // 4) for i in again.indices(s)]
    assert len(set(one_epoch)) == len(one_epoch)  # no window twice within an epoch
    other = loader.TrainBatches(windows, 4, seed=6)
    assert any(not np.array_equal(other(s)["inputs"], full[s]["inputs"]) for s in range(3))
    # Each process reads only its rows; together they are the global batch.
    halves = [loader.TrainBatches(windows, 4, seed=5, rows=r)(k) for r in (slice(0, 2), slice(2, 4))]
    np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), full[k]["inputs"])


def test_array_batches_keep_every_row_once_and_pad_the_last_batch_with_zero_weight():
    n, seq = 5, 3
    arrays = {
        "inputs": np.arange(n * seq, dtype=np.int32).reshape(n, seq),
        "targets": np.arange(n * seq, dtype=np.int32).reshape(n, seq) + 100,
        "weights": np.ones((n, seq), np.float32),
    }
    batches = list(loader.array_batches(arrays, 2))
    assert [b["inputs"].shape for b in batches] == [(2, seq)] * 3
    assert np.array_equal(np.concatenate([b["inputs"] for b in batches])[:n], arrays["inputs"])
    assert np.array_equal(batches[-1]["inputs"][1], arrays["inputs"][0])  # the filler repeats row 0...
    assert batches[-1]["weights"][1].sum() == 0 and sum(b["weights"].sum() for b in batches) == n * seq  # ...unweighted
    assert len(list(loader.array_batches(arrays, 2, max_batches=1))) == 1
    halves = list(loader.array_batches(arrays, 2, rows=slice(1, 2)))  # one process's rows of each batch
    assert [b["inputs"].shape for b in halves] == [(1, seq)] * 3
