"""Recipes, overrides and the preprocess/loader contract."""

import json
from pathlib import Path

import numpy as np
import pytest

from bigmodel_cli import config
from bigmodel_cli.data import loader
from bigmodel_cli.data.manifest import load_manifest
from bigmodel_cli.data.preprocess import PreprocessConfig
from bigmodel_cli.data.preprocess import run as preprocess
from bigmodel_cli.errors import UserError
from tests.conftest import REPO, synthetic_text

# recipes/eval holds evaluation suites, not training recipes: tests/test_eval_suite.py parses those
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.toml") if p.parent.name != "eval")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_parses_and_starts_with_a_comment(recipe):
    from bigmodel_cli.finetune import FinetuneConfig

    cls = FinetuneConfig if "finetune" in recipe.parts else config.Config
    cfg = config.load_config(recipe, cls=cls)
    assert cfg.train.steps > 0
    assert recipe.read_text().startswith("#"), "a recipe begins with a comment: command, cost, expected loss"


def test_overrides_presets_and_relative_paths(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\npreset = "125m"\nn_layers = 3\n[data]\npath = "corpus"\n')
    cfg = config.load_config(recipe, ["optim.lr=0.5", "train.steps=7", "model.tie_embeddings=true"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.tie_embeddings) == (768, 3, True)
    assert cfg.optim.lr == 0.5 and cfg.train.steps == 7
    assert cfg.data.path == str((tmp_path / "corpus").resolve())
    dumped = tmp_path / "config.toml"
    dumped.write_text(config.dumps(cfg))
    assert config.load_config(dumped) == cfg  # the written config reproduces the run


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "did you mean 'lr'"),
        ("trian.steps=1", "did you mean 'train'"),
        ("train.steps=1.5", "must be int"),
        ("train.batch_size=0", "must be positive"),
        ("model.preset=huge", "unknown"),
        ("model.n_heads=3", "must divide"),
        ("mesh.data=0", "mesh sizes"),
        ("oops", "section.key=value"),
    ],
)
def test_bad_overrides_raise_one_clear_error(override, message):
    with pytest.raises(UserError, match=message):
        config.load_config(None, [override])


def test_typed_values_come_after_the_recipe_and_before_set(tmp_path, monkeypatch):
    from bigmodel_cli.finetune_config import FinetuneConfig

    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "sub" / "r.toml"
    recipe.parent.mkdir()
    recipe.write_text('[finetune]\ntask = "qa"\ntrain_file = "recipe.json"\nval_file = "dev.json"\n')
    values = {"finetune": {"task": "classify", "train_file": Path("a=b,c.csv"), "val_fraction": 0.25}}
    cfg = config.load_config(recipe, ["finetune.val_file=v=1,2.csv"], cls=FinetuneConfig, values=values)
    assert cfg.finetune.task == "classify" and cfg.finetune.val_fraction == 0.25
    assert cfg.finetune.train_file == str(tmp_path / "a=b,c.csv")  # relative to cwd, like a --set path
    assert cfg.finetune.val_file == str(tmp_path / "v=1,2.csv")
    cfg = config.load_config(recipe, ["finetune.task=qa"], cls=FinetuneConfig, values=values)
    assert cfg.finetune.task == "qa"  # --set wins over a flag
    assert cfg.finetune.val_file == str(tmp_path / "sub" / "dev.json")  # the recipe's, relative to the recipe
    with pytest.raises(UserError, match="--set finetune.train_file contains a NUL character"):
        config.load_config(None, cls=FinetuneConfig, values={"finetune": {"train_file": Path("a\0b")}})
    with pytest.raises(UserError, match="unknown task 'nope'"):
        config.load_config(None, cls=FinetuneConfig, values={"finetune": {"task": "nope"}})


def test_finetune_flags_reach_the_config_whole(cli, tmp_path, monkeypatch):
    from bigmodel_cli import finetune

    seen = []
    monkeypatch.setattr(finetune, "run", lambda cfg, *args, **kwargs: seen.append(cfg))
    monkeypatch.chdir(tmp_path)
    args = ["finetune", "--task", "classify", "--init-from", "base", "--data", "x=1,y.csv"]
    cli(*args, "--val-data", "dev,2.csv", "--columns", "label,title,text", "--run-dir", tmp_path / "run")
    cli(*args, "--columns", "label,text", "--set", "task.columns=text,label", "--set", "finetune.init_from=other")
    first, second = (cfg.finetune for cfg in seen)
    assert (first.task, first.init_from) == ("classify", str(tmp_path / "base"))
    assert (first.train_file, first.val_file) == (str(tmp_path / "x=1,y.csv"), str(tmp_path / "dev,2.csv"))
    assert [cfg.task.columns for cfg in seen] == ["label,title,text", "text,label"]  # --set wins over --columns
    assert second.init_from == str(tmp_path / "other")


def _make(tmp_path: Path, name: str, **kw) -> dict:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(synthetic_text(400), encoding="utf-8")
    return preprocess(PreprocessConfig(inputs=(corpus,), out=tmp_path / name, **kw))


def test_preprocess_is_deterministic_and_char_vocab_sizes_itself(tmp_path):
    first = _make(tmp_path, "a", model_type="char")
    _make(tmp_path, "b", model_type="char")
    for name in ("train-00000.bin", "val-00000.bin", "tokenizer.model", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    chars = set(synthetic_text(400)) - {" ", "\n"}
    assert first["tokenizer"]["vocab_size"] == len(chars) + 6 + 256  # specials, newline, word boundary, bytes
    assert first["dtype"] == "uint16"
    assert first["inputs"][0]["sha256"] and first["splits"]["val"]["tokens"] > 0


def test_preprocess_jsonl_and_bpe(tmp_path):
    lines = [json.dumps({"body": t}) for t in synthetic_text(300).splitlines()]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    manifest = preprocess(
        PreprocessConfig(
            inputs=(tmp_path / "docs.jsonl",), out=tmp_path / "out", vocab_size=400, model_type="bpe", text_field="body"
        )
    )
    assert manifest["documents"] == 300 and manifest["tokenizer"]["vocab_size"] == 400
    tokens = np.fromfile(tmp_path / "out" / "train-00000.bin", dtype=np.uint16)
    assert (tokens == manifest["tokenizer"]["eos_id"]).sum() >= 250  # an EOS after every document


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        (b"\xff\xfe\x00bad", ".txt", "not UTF-8"),
        (b'{"text": "ok"}\n{broken\n', ".jsonl", ":2 is not valid JSON"),
        (b'{"body": "x"}\n', ".jsonl", "has no field 'text'"),
        (b"   \n", ".txt", "hold no text"),
        (b"a,b\n", ".csv", "has no column 'text'"),
        (b"PK\x03\x04", ".docx", "unsupported file type"),
    ],
)
def test_preprocess_bad_inputs_leave_nothing_behind(tmp_path, content, suffix, message):
    bad = tmp_path / f"input{suffix}"
    bad.write_bytes(content)
    with pytest.raises(UserError, match=message):
        preprocess(PreprocessConfig(inputs=(bad,), out=tmp_path / "out", model_type="char"))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [bad.name]


def test_batches_are_a_pure_function_of_the_step(tmp_path):
    _make(tmp_path, "d", model_type="char")
    manifest = load_manifest(tmp_path / "d")
    windows = loader.TokenWindows(tmp_path / "d", "train", manifest, 32)
    a = loader.TrainBatches(windows, 4, seed=3)
    b = loader.TrainBatches(windows, 4, seed=3)
    later = [a(step)["inputs"] for step in range(0, 3 * windows.count // 4)]  # crosses epoch boundaries
    for step in (7, 2, windows.count // 4 + 1):
        np.testing.assert_array_equal(b(step)["inputs"], later[step])
    epoch = np.concatenate([a.indices(s) for s in range(windows.count // 4)])
    assert len(set(epoch.tolist())) == len(epoch)  # no window repeats within an epoch
    np.testing.assert_array_equal(a(0)["targets"][:, :-1], a(0)["inputs"][:, 1:])
