"""The data pipeline on small data made here: every source kind, tokenizer options, streaming preprocess
(shards, splits, atomic finish, determinism). The loader's packing, mixtures and order: test_loader.py."""

import gzip
import json
import time

import numpy as np
import pytest
import sentencepiece as spm

from bigmodel_cli.data import hf_datasets, loader, sources
from bigmodel_cli.data import manifest as manifest_lib
from bigmodel_cli.data import preprocess as pp
from bigmodel_cli.data.tokenizer import Tokenizer
from bigmodel_cli.errors import UserError
from tests.conftest import pretrain_args, synthetic_text
from tests.data_helpers import all_tokens, decoded_docs, docs, make

POEMS = [
    {"chapter": "行宮", "author": "元稹", "paragraphs": ["寥落古行宮，宮花寂寞紅。", "白頭宮女在，閒坐說玄宗。"]},
    {"chapter": "登鸛雀樓", "author": "王之渙", "paragraphs": ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"]},
    {"chapter": "相思", "author": "王維", "paragraphs": ["紅豆生南國，春來發幾枝。", "願君多采擷，此物最相思。"]},
]


# ---- sources -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("file", ["a b\nc d\n\ne f\n"]),
        ("line", ["a b", "c d", "e f"]),
        ("paragraph", ["a b\nc d", "e f"]),
    ],
)
def test_txt_modes(tmp_path, mode, expected):
    (tmp_path / "t.txt").write_text("a b\nc d\n\ne f\n")
    src = sources.expand([tmp_path / "t.txt"])[0]
    pieces = list(src.pieces(sources.ReadOptions(txt_mode=mode)))
    assert [t for t, _ in pieces] == expected and all(last for _, last in pieces)


def test_txt_modes_read_in_blocks_match_a_whole_file_reading(tmp_path, monkeypatch):
    """Documents of random texts (blank and whitespace-only lines, lines longer than a piece) read in
    blocks, against the documents of the whole text split by hand."""
    rng = np.random.default_rng(0)
    monkeypatch.setattr(sources, "PIECE_CHARS", 6)
    path = tmp_path / "r.txt"
    for _ in range(150):
        text = "".join(rng.choice(["a", "b ", "\n", "\n\n", "  ", "xyz" * int(rng.integers(1, 6)), "\t"], 30))
        path.write_text(text)
        lines = text.split("\n")
        paragraphs = "\n".join(line if line.strip() else "" for line in lines).split("\n\n")
        expected = {
            "file": [text] if text.strip() else [],
            "line": [line for line in lines if line.strip()],
            "paragraph": [p.strip("\n") for p in paragraphs if p.strip()],
        }
        for mode, want in expected.items():
            got, cur = [], ""
            for piece, last in sources.expand([path])[0].pieces(sources.ReadOptions(txt_mode=mode)):
                assert len(piece) <= 6
                cur += piece
                if last:
                    got, cur = [*got, cur], ""
            assert got == want, (mode, text)


def test_long_documents_stream_in_pieces_that_encode_like_the_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_CHARS", 200)
    text = "\n".join(docs(60, seed=3)) + "\n"
    (tmp_path / "big.txt").write_text(text + "x" * 450 + "\n")  # also one line longer than a piece
    pieces = [t for t, _ in sources.expand([tmp_path / "big.txt"])[0].pieces(sources.ReadOptions())]
    assert len(pieces) > 10 and max(map(len, pieces)) <= 200 and "".join(pieces) == text + "x" * 450 + "\n"
    (tmp_path / "big.txt").write_text(text)
    pieces = list(sources.expand([tmp_path / "big.txt"])[0].pieces(sources.ReadOptions()))
    assert [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    manifest, out = make(tmp_path, [tmp_path / "big.txt"], model_type="bpe", vocab_size=300)
    tk = Tokenizer(out / "tokenizer.model")
    # Pieces are cut after newlines, and tokenizers are trained without a dummy prefix: encoding the pieces
    # one by one gives exactly the tokens of the whole text.
    assert [i for t, _ in pieces for i in tk.encode([t])[0]] == tk.encode([text])[0]
    assert manifest["documents"] == 1 and manifest["splits"]["val"]["tokens"] > 0


def test_jsonl_json_nested_fields_and_tang_layout(tmp_path):
    records = [{"meta": {"title": f"t{i}"}, "body": {"lines": [f"line {i}a", f"line {i}b"]}} for i in range(3)]
    (tmp_path / "n.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    src = sources.expand([tmp_path / "n.jsonl"])[0]
    got = [t for t, _ in src.pieces(sources.ReadOptions(text_fields=("meta.title", "body.lines")))]
    assert got == [f"t{i}\nline {i}a\nline {i}b" for i in range(3)]

    # The Tang poems file: an object whose nested lists hold the poems; records are found by their fields.
    tang = {"title": "唐詩三百首", "content": [{"type": "五言絕句", "content": POEMS}]}
    (tmp_path / "tang.json").write_text(json.dumps(tang, ensure_ascii=False), encoding="utf-8")
    src = sources.expand([tmp_path / "tang.json"])[0]
    poems = [t for t, _ in src.pieces(sources.ReadOptions(text_fields=("paragraphs",)))]
    assert poems[0] == "寥落古行宮，宮花寂寞紅。\n白頭宮女在，閒坐說玄宗。" and len(poems) == 3
    fields = sources.parse_text_fields("chapter,paragraphs")
    titled = [t for t, _ in src.pieces(sources.ReadOptions(text_fields=fields))]
    assert titled[1].startswith("登鸛雀樓\n白日依山盡")
    with pytest.raises(UserError, match="no JSON object holds the field"):
        list(src.pieces(sources.ReadOptions(text_fields=("verses",))))
    # A .json file that is really JSON lines, and a JSON array of strings.
    (tmp_path / "lines.json").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "strings.json").write_text('["alpha", "beta"]')
    for name, want in (("lines.json", ["one", "two"]), ("strings.json", ["alpha", "beta"])):
        assert [t for t, _ in sources.expand([tmp_path / name])[0].pieces(sources.ReadOptions())] == want


def test_csv_tsv_parquet_directories_and_globs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.csv").write_text('id,text\n1,"hello, world"\n2,"two\nlines"\n')
    (data / "sub" / "b.tsv").write_text('text\tlabel\nsay "hi"\t1\n')
    pq.write_table(pa.table({"text": ["from parquet", None, "again"], "n": [1, 2, 3]}), data / "c.parquet")
    (data / "notes.md").write_text("ignored: not a data file")
    found = sources.expand([data])
    assert [s.name for s in found] == ["data/a.csv", "data/c.parquet", "data/sub/b.tsv"]
    texts = [t for s in found for t, _ in s.pieces(sources.ReadOptions())]
    assert texts == ["hello, world", "two\nlines", "from parquet", "again", 'say "hi"']
    assert [s.name for s in sources.expand([str(data / "**" / "*.tsv")])] == ["b.tsv"]
    with pytest.raises(UserError, match="matches no data files"):
        sources.expand([str(tmp_path / "*.nothing")])
    with pytest.raises(UserError, match="has no column 'body'"):
        list(found[1].pieces(sources.ReadOptions(text_fields=("body",))))


def test_compressed_inputs_give_the_same_tokens(tmp_path):
    import zstandard

    text = "\n".join(docs(40)) + "\n"
    plain = tmp_path / "plain" / "c.txt"
    plain.parent.mkdir()
    plain.write_text(text)
    (tmp_path / "gz").mkdir()
    with gzip.open(tmp_path / "gz" / "c.txt.gz", "wt") as f:
        f.write(text)
    (tmp_path / "zst").mkdir()
    (tmp_path / "zst" / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    outs = [make(tmp_path, [tmp_path / d], name=f"o-{d}")[1] for d in ("plain", "gz", "zst")]
    for out in outs[1:]:
        for name in ("train-00000.bin", "val-00000.bin", "tokenizer.model"):
            assert (out / name).read_bytes() == (outs[0] / name).read_bytes()
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="not a valid .gz file"):
        make(tmp_path, [tmp_path / "bad.jsonl.gz"], name="bad")


def test_hf_datasets_offline_fail_fast_with_one_clear_error(tmp_path, monkeypatch):
    assert sources.parse_hf("hf:user/name:cfg@validation") == ("user/name", "cfg", "validation")
    assert sources.parse_hf("hf:wikitext") == ("wikitext", None, "train")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    for offline in (True, False):
        if offline:
            monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        else:  # no offline flag, and no network: the probe answers (here, stubbed) that the Hub is unreachable
            monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setattr(hf_datasets, "hub_reachable", lambda timeout=0: False)
        t0 = time.monotonic()
        with pytest.raises(UserError, match=r"cannot be reached \(offline\).*not in the local datasets cache"):
            make(tmp_path, ["hf:bigmodel-test/does-not-exist@train"], name=f"hf{offline}")
        assert time.monotonic() - t0 < 30 and not (tmp_path / f"hf{offline}").exists()


# ---- tokenizers --------------------------------------------------------------------------------


def test_special_tokens_byte_fallback_and_coverage(tmp_path):
    chat = [f"<|user|> {d} <|assistant|> ok" for d in docs(80)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"text": c}) for c in chat) + "\n")
    manifest, out = make(
        tmp_path,
        [tmp_path / "chat.jsonl"],
        model_type="unigram",
        vocab_size=300,
        special_tokens=("<|user|>", "<|assistant|>"),
    )
    tk = Tokenizer(out / "tokenizer.model")
    user, assistant = tk.sp.piece_to_id("<|user|>"), tk.sp.piece_to_id("<|assistant|>")
    assert (user, assistant) == (5, 6)  # after <unk> <s> </s> <pad> and the newline
    ids = tk.encode(["<|user|> hi <|assistant|> ok"])[0]
    assert ids.count(user) == 1 and ids.count(assistant) == 1
    assert tk.decode(tk.encode(["ünïcødé 漢字 ☃"])[0]) == "ünïcødé 漢字 ☃"  # byte fallback: nothing is lost
    assert manifest["options"]["special_tokens"] == ["<|user|>", "<|assistant|>"]
    with pytest.raises(UserError, match="special-tokens"):
        make(tmp_path, [tmp_path / "chat.jsonl"], name="bad", special_tokens=("a b",))


def test_sample_lines_is_a_seeded_uniform_reservoir():
    pieces = [("\n".join(f"l{i}-{j}" for j in range(10)), True) for i in range(1000)]  # 10,000 lines
    a = pp.sample_lines(iter(pieces), 500)
    assert a == pp.sample_lines(iter(pieces), 500) and len(set(a)) == 500
    firsts = sum(int(line.split("-")[0][1:]) < 500 for line in a)
    assert 200 < firsts < 300  # about half from each half of the stream
    assert pp.sample_lines(iter(pieces[:3]), 500) == [f"l{i}-{j}" for i in range(3) for j in range(10)]


@pytest.mark.parametrize("eos", [2, -1])
def test_existing_tokenizer_ids_come_from_the_model(tmp_path, eos):
    """A model with no pad (and one with no EOS either) works: ids are read, never assumed."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs(60)) + "\n")
    model = tmp_path / "given.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs(200)),
        model_prefix=str(model.with_suffix("")),
        vocab_size=60,
        model_type="bpe",
        pad_id=-1,
        bos_id=1,
        eos_id=eos,
        unk_id=0,
        minloglevel=2,
    )
    manifest, out = make(tmp_path, [corpus], tokenizer=model, pack_documents=True)
    info = manifest["tokenizer"]
    assert (info["pad_id"], info["eos_id"], info["model_type"]) == (-1, eos, "given")
    assert (all_tokens(out, "train") == 2).any() == (eos == 2)  # EOS separators only when the model has one
    windows = loader.TokenWindows(out, "train", manifest, 16)
    seg = np.concatenate([windows.segments(i)[0] for i in range(windows.count)])
    assert seg.max() > 1  # document boundaries are known either way


# ---- preprocess: splits, shards, determinism, atomic finish ------------------------------------


def test_reruns_are_byte_identical_whatever_the_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "BATCH_CHARS", 2000)  # many batches: the worker-pool path
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs(400)) + "\n")
    kw = dict(model_type="unigram", vocab_size=300, shard_tokens=3000, pack_documents=True)
    _, a = make(tmp_path, [tmp_path / "c.jsonl"], name="a", workers=1, **kw)
    _, b = make(tmp_path, [tmp_path / "c.jsonl"], name="b", workers=2, **kw)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) > 6
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_documents_split_evenly_and_shards_read_back_as_one_stream(tmp_path):
    texts = docs(200)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in texts) + "\n")
    manifest, out = make(tmp_path, [tmp_path / "c.jsonl"], shard_tokens=500, pack_documents=True)
    val_docs = [i for i in range(200) if pp.is_val(i, 0.1)]
    assert len(val_docs) == 20 and val_docs[:2] == [4, 14]
    assert decoded_docs(out) == [t for i, t in enumerate(texts) if i not in val_docs] + [texts[i] for i in val_docs]
    files = manifest["splits"]["train"]["files"]
    assert len(files) > 3 and all(f["tokens"] == 500 for f in files[:-1])
    assert sum(f["tokens"] for f in files) == manifest["splits"]["train"]["tokens"]
    # Windows read across file ends exactly as from one array; segment starts too.
    stream = all_tokens(out, "train").astype(np.int32)
    windows = loader.TokenWindows(out, "train", manifest, 64)
    assert windows.count == (len(stream) - 1) // 64
    for i in range(windows.count):
        np.testing.assert_array_equal(windows.window(i), stream[i * 64 : i * 64 + 65])
    eos = manifest["tokenizer"]["eos_id"]
    np.testing.assert_array_equal(windows.starts, np.concatenate([[0], np.flatnonzero(stream == eos)]))


def test_tiny_corpus_is_split_by_tokens(tmp_path):
    (tmp_path / "one.txt").write_text("just one small document\n" * 20)
    manifest, out = make(tmp_path, [tmp_path / "one.txt"])
    total = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    assert manifest["splits"]["val"]["tokens"] == int(total * 0.1)


def _preprocess(cli, *args) -> dict:
    """`bigmodel --log-format json preprocess ARGS...`: its result line."""
    return json.loads(
        cli("--log-format", "json", "preprocess", *args, "--workers", "1").stdout.strip().splitlines()[-1]
    )


def test_val_fraction_0_and_1_keep_a_file_whole_through_the_cli(cli, tmp_path):
    """0: all train (a corpus to train on, no val files); 1: all val (a held-out test file, evaluated whole)."""
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs(50)) + "\n")
    (tmp_path / "one.txt").write_text("a single tiny document\n")  # whole even below 1/f documents
    for inputs in ("c.jsonl", "one.txt"):
        train_only, held_out = tmp_path / f"train-{inputs}", tmp_path / f"held-{inputs}"
        result = _preprocess(cli, tmp_path / inputs, "--out", train_only, "--model-type", "char", "--val-fraction", "0")
        assert result["val_tokens"] == 0 and result["train_tokens"] > 0
        assert not list(train_only.glob("val-*")) and manifest_lib.load_manifest(train_only)["splits"].keys() == {
            "train"
        }
        tokenizer = train_only / "tokenizer.model"
        result = _preprocess(cli, tmp_path / inputs, "--out", held_out, "--tokenizer", tokenizer, "--val-fraction", "1")
        assert result["train_tokens"] == 0 and not list(held_out.glob("train-*"))
        assert manifest_lib.load_manifest(held_out)["splits"].keys() == {"val"}
        # The same documents with the same tokenizer: the held-out split is the other's train split exactly.
        assert all_tokens(held_out, "val").tobytes() == all_tokens(train_only, "train").tobytes()
        with pytest.raises(UserError, match="has no 'train' split \\(has val\\)"):
            loader.TokenWindows(held_out, "train", manifest_lib.load_manifest(held_out), 8)
    for bad in ("-0.1", "1.5", "nan"):
        result = cli("preprocess", tmp_path / "one.txt", "--out", tmp_path / "bad", "--val-fraction", bad, ok=False)
        assert result.exit_code != 0 and "--val-fraction must be from 0" in result.stderr
        assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_pretrain_without_val_trains_and_evaluate_reads_a_held_out_file(cli, tiny_data, tmp_path):
    run = tmp_path / "run"
    cli(*pretrain_args(run, tiny_data, {"train.steps": 2, "checkpoint.every": 2}))
    (tmp_path / "test.txt").write_text(synthetic_text(200, seed=1), encoding="utf-8")
    tokenizer = run / "tokenizer.model"
    _preprocess(cli, tmp_path / "test.txt", "--out", tmp_path / "held", "--tokenizer", tokenizer, "--val-fraction", "1")
    metrics = json.loads(
        cli("evaluate", run, "--data", tmp_path / "held", "--split", "val", "--json").stdout.strip().splitlines()[-1]
    )
    assert metrics["split"] == "val" and metrics["tokens"] > 0 and np.isfinite(metrics["loss"])
    wrong = cli("evaluate", run, "--data", tmp_path / "held", "--split", "train", ok=False)
    assert wrong.exit_code != 0 and "'train' is not in" in wrong.stderr

    _preprocess(cli, tmp_path / "test.txt", "--out", tmp_path / "all", "--tokenizer", tokenizer, "--val-fraction", "0")
    cli(*pretrain_args(tmp_path / "run2", tmp_path / "all", {"train.steps": 2, "checkpoint.every": 2}))
    rows = [json.loads(line) for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and not any("val_loss" in r for r in rows)  # trains, without validation
    # The same data as a mixture's part: trained on too (it was refused), validation from the parts that have it.
    mixed = {"train.steps": 2, "checkpoint.every": 2, "data.path": "", "data.mixture": f"{tmp_path / 'all'}:1"}
    cli(*pretrain_args(tmp_path / "run4", tiny_data, {**mixed, "data.mixture": f"{tmp_path / 'all'}:1,{tiny_data}:1"}))
    rows = [json.loads(line) for line in (tmp_path / "run4" / "metrics.jsonl").read_text().splitlines()]
    assert "val_loss" in rows[-1]
    no_val = cli(*pretrain_args(tmp_path / "run5", tiny_data, mixed))  # no part has one: no validation
    assert "val_loss" not in no_val.stdout
    unnamed = cli("evaluate", tmp_path / "run5", ok=False)  # a mixture names no one directory to evaluate on
    assert unnamed.exit_code == 2 and "names no one data directory" in unnamed.stderr and "None" not in unnamed.stderr
    refused = cli(*pretrain_args(tmp_path / "run3", tmp_path / "held", {"train.steps": 2}), ok=False)
    assert refused.exit_code != 0 and "has no train split" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "run3").exists()


def test_interrupted_preprocess_leaves_nothing_and_reruns(tmp_path, monkeypatch):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs(100)) + "\n")
    real_append = pp.ShardWriter.append
    calls = []

    def failing_append(self, tokens, starts):
        calls.append(1)
        real_append(self, tokens, starts)  # some bytes are on disk already
        raise KeyboardInterrupt

    monkeypatch.setattr(pp.ShardWriter, "append", failing_append)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path, [tmp_path / "c.jsonl"])
    assert calls and sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no out, no staging
    monkeypatch.setattr(pp.ShardWriter, "append", real_append)
    manifest, out = make(tmp_path, [tmp_path / "c.jsonl"])
    assert (out / "manifest.json").is_file() and manifest["documents"] == 100


def test_check_compatible_names_the_mismatch(tmp_path):
    manifest = {"tokenizer": {"sha256": "a" * 64, "vocab_size": 500}}
    manifest_lib.check_compatible(manifest, "a" * 64, 512)
    manifest_lib.check_compatible(manifest, None, 500)
    with pytest.raises(UserError, match="different tokenizer"):
        manifest_lib.check_compatible(manifest, "b" * 64, 512)
    with pytest.raises(UserError, match="vocabulary of 500 tokens but the model only 400"):
        manifest_lib.check_compatible(manifest, "a" * 64, 400)
