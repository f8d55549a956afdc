"""hf:ORG/NAME[@REVISION]: Hub models through huggingface_hub's cache, offline, laid out exactly as it lays one out."""

import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach for the Hub

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from bigmodel_cli import modelio
from bigmodel_cli.data.tokenizer import Tokenizer, train
from bigmodel_cli.errors import UserError
from tests.conftest import TINY_HF_SHAPE, run_cli_subprocess

REPO = "bigmodel-test/tiny-llama"
PICKLED = "bigmodel-test/pickled"
MAIN, TAGGED = "a" * 40, "b" * 40  # commit hashes: main, and the commit tagged v1
LFS_SUFFIXES = (".safetensors", ".model", ".bin")  # the Hub stores these in LFS: their blob is named by sha256


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ()) -> Path:
    """Files cached as huggingface_hub caches them (file_download.py): blobs/ named by the file's etag (sha256
    for LFS files, the git blob sha1 otherwise), snapshots/COMMIT/NAME a relative symlink to its blob, and
    refs/REF holding the commit a branch or tag names."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        if name.endswith(LFS_SUFFIXES):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return repo / "snapshots" / commit


def saved_llama(directory: Path, vocab_size: int, seed: int, **save_kwargs) -> dict[str, bytes]:
    """A tiny random LlamaForCausalLM saved by transformers (safetensors), as {file name: bytes}."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        **TINY_HF_SHAPE,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(directory, **save_kwargs)
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hugging Face cache with REPO at two commits (main; tag v1 with other weights) and a pickle-only repo."""
    root = tmp_path_factory.mktemp("hub")
    sentencepiece = root / "tokenizer.model"
    corpus = [f"the {c} fox sees the owl in the garden; count to {i}.\n" * 3 for i, c in enumerate("rgbk" * 40)]
    train(corpus, sentencepiece, 300, "bpe")
    vocab = Tokenizer(sentencepiece).vocab_size
    tokenizer = {"tokenizer.model": sentencepiece.read_bytes()}
    cache = root / "cache"
    main = add_snapshot(cache, REPO, MAIN, {**saved_llama(root / "main", vocab, 0), **tokenizer}, ("main",))
    tagged = add_snapshot(cache, REPO, TAGGED, {**saved_llama(root / "v1", vocab, 1), **tokenizer}, ("v1",))
    config = (main / "config.json").read_bytes()
    add_snapshot(cache, PICKLED, MAIN, {"config.json": config, "pytorch_model.bin": b"never unpickled"}, ("main",))
    return {"root": root, "cache": cache, "main": main, "tagged": tagged}


@pytest.fixture
def offline(hub, monkeypatch):
    """This process's huggingface_hub reads the test cache, offline (as HF_HUB_CACHE and HF_HUB_OFFLINE=1 set it)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(hub):
    info = {repo.repo_id: repo for repo in huggingface_hub.scan_cache_dir(hub["cache"]).repos}
    assert set(info) == {REPO, PICKLED} and not huggingface_hub.scan_cache_dir(hub["cache"]).warnings
    revisions = {r.commit_hash: r for r in info[REPO].revisions}
    assert {c: set(r.refs) for c, r in revisions.items()} == {MAIN: {"main"}, TAGGED: {"v1"}}
    assert {f.file_name for f in revisions[MAIN].files} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.model",
    }
    cached = huggingface_hub.try_to_load_from_cache(REPO, "config.json", cache_dir=hub["cache"], revision="v1")
    assert Path(cached) == hub["tagged"] / "config.json"


def test_revisions_pick_their_snapshot_and_a_local_directory_wins(offline, tmp_path, monkeypatch):
    assert modelio.locate(Path(f"hf:{REPO}")) == ("hf", offline["main"], None)
    assert modelio.locate(Path(f"hf:{REPO}@main"))[1] == offline["main"]
    assert modelio.locate(Path(f"hf:{REPO}@v1"))[1] == offline["tagged"]  # a tag (a named ref)
    assert modelio.locate(Path(f"hf:{REPO}@{TAGGED}"))[1] == offline["tagged"]  # a commit hash
    with pytest.raises(UserError, match=f"hf:{REPO}@v2: no local directory {REPO}.*hf download {REPO}"):
        modelio.locate(Path(f"hf:{REPO}@v2"))
    local = tmp_path / REPO
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert modelio.locate(Path(f"hf:{REPO}")) == ("hf", Path(REPO), None)  # a directory of that name wins
    for not_an_id in ("./tiny", "a/b/c", "/abs/dir", "org/bad..name", f"{REPO}@"):
        with pytest.raises(UserError, match="is not a directory: hf: takes a local .* or a Hub id"):
            modelio.locate(Path(f"hf:{not_an_id}"))


GENERATE = ["--prompt", "the red fox", "--max-new-tokens", "12", "--temperature", "0"]


def _generate(model, **run):
    # In a process of its own: huggingface_hub reads HF_HUB_CACHE and HF_HOME once, when imported.
    return run_cli_subprocess("generate", model, *GENERATE, **run)


@pytest.mark.slow
def test_generate_reads_the_cache_named_by_the_environment(hub, monkeypatch, cli):
    env = {"HF_HUB_CACHE": str(hub["cache"]), "HF_HUB_OFFLINE": "1"}
    by_id = _generate(f"hf:{REPO}", env=env)
    assert by_id.stdout == cli("generate", f"hf:{hub['main']}", *GENERATE).stdout  # the snapshot's directory
    assert by_id.stdout.startswith("the red fox") and len(by_id.stdout) > len("the red fox\n")
    assert "fetching" not in by_id.stderr  # cached: no download was attempted
    assert _generate(f"hf:{REPO}@v1", env=env).stdout != by_id.stdout  # the tag's other weights: other text
    (hub["root"] / "home").mkdir()
    (hub["root"] / "home" / "hub").symlink_to(hub["cache"])  # without HF_HUB_CACHE, the cache is HF_HOME/hub
    home = {"HF_HOME": str(hub["root"] / "home"), "HF_HUB_OFFLINE": "1"}
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert _generate(f"hf:{REPO}", env=home).stdout == by_id.stdout


def test_uncached_and_pickle_only_models_fail_in_one_line(offline, cli, tmp_path):
    out = tmp_path / "out"
    result = cli("export", f"hf:{REPO.replace('tiny', 'absent')}", "--format", "hf", "--out", out, ok=False)
    assert result.exit_code != 0 and not out.exists()
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.output
    assert "is not in the cache" in line and "HF_HUB_OFFLINE is set" in line
    assert f"hf download {REPO.replace('tiny', 'absent')}" in line and "HF_HUB_CACHE" in line
    run, data = tmp_path / "run", tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "count to three", "input": "", "output": "one two three."}] * 8))
    result = cli(
        "finetune", "--task", "instruct", "--init-from", "hf:org/absent", "--data", data, "--run-dir", run, ok=False
    )
    assert result.exit_code != 0 and not run.exists() and "hf download org/absent" in result.stderr

    result = cli("generate", f"hf:{PICKLED}", ok=False)
    assert result.exit_code != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "pytorch_model.bin" in result.stderr and "pickle" in result.stderr


@pytest.mark.slow
def test_finetune_a_hub_model_with_lora_then_export_it(offline, cli, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "count to three", "input": "", "output": "one two three."}] * 8))
    run = tmp_path / "run"
    steps = ["--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "train.eval_every=2"]
    lora = ["--set", "lora.rank=4", "--set", "task.max_target_tokens=24"]
    cli("finetune", "--task", "instruct", "--init-from", f"hf:{REPO}", "--data", data, "--run-dir", run, *steps, *lora)
    assert f'init_from = "hf:{REPO}"' in (run / "config.toml").read_text()  # the Hub id, not a path under cwd
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss"])

    # Exporting the run reopens its base model from the cache through the recorded id.
    cli("export", run, "--format", "hf", "--out", tmp_path / "finetuned")
    assert (tmp_path / "finetuned" / "model.safetensors").is_file()
    # The Hub model itself re-exports bit for bit.
    cli("export", f"hf:{REPO}", "--format", "hf", "--out", tmp_path / "plain")
    original, exported = (
        load_file(offline["main"] / "model.safetensors"),
        load_file(tmp_path / "plain" / "model.safetensors"),
    )
    assert sorted(original) == sorted(exported)
    assert all(np.array_equal(exported[name], array) for name, array in original.items())


# ----------------------------------------------------------------------------------------------------------
# Online: the download itself, with huggingface_hub's snapshot_download standing in for the network
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def online(hub, tmp_path, monkeypatch):
    """An empty cache, online, where snapshot_download "downloads" from `remote` ({repo: {file: bytes}}) the files
    its allow_patterns select (filtered by huggingface_hub's own filter), recording each call."""
    cache, remote, calls = tmp_path / "cache", {}, []
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    real = huggingface_hub.snapshot_download

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        calls.append({"revision": revision, "allow_patterns": allow_patterns, "local_files_only": local_files_only})
        if local_files_only:
            return real(repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=True, **kwargs)
        if repo_id not in remote:
            raise LocalEntryNotFoundError("Cannot reach the Hub (the test's network is down)")
        files = remote[repo_id]
        wanted = {name: files[name] for name in filter_repo_objects(files, allow_patterns=allow_patterns)}
        return str(add_snapshot(cache, repo_id, MAIN, wanted, () if revision == MAIN else ("main",)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return {**hub, "cache": cache, "remote": remote, "calls": calls}


def test_a_download_fetches_only_what_bigmodel_reads(online, tmp_path):
    files = {p.name: p.read_bytes() for p in online["main"].iterdir()}
    online["remote"][REPO] = {
        **files,
        "pytorch_model.bin": b"never fetched",
        "consolidated.safetensors": b"a second copy of the weights",
        "original/config.json": b"{}",
        "onnx/model.onnx": b"",
        "README.md": b"# tiny",
    }
    kind, home, _ = modelio.locate(Path(f"hf:{REPO}"))
    assert kind == "hf" and home == online["cache"] / f"models--{REPO.replace('/', '--')}" / "snapshots" / MAIN
    assert sorted(p.name for p in home.iterdir()) == sorted(files)
    assert [c["local_files_only"] for c in online["calls"]] == [True, False]
    assert modelio.load(Path(f"hf:{REPO}")).model_cfg.n_layers == 2
    assert [c["local_files_only"] for c in online["calls"]][2:] == [True]  # now cached: the Hub is not asked

    with pytest.raises(UserError, match="hf:org/absent: .* neither in the cache .* nor reachable: run `hf download"):
        modelio.locate(Path("hf:org/absent"))


def test_a_download_follows_an_index_naming_other_shard_files(online, tmp_path):
    files = saved_llama(tmp_path / "sharded", 300, 0, max_shard_size="30KB")
    index = json.loads(files.pop("model.safetensors.index.json"))
    renamed = {old: f"weights-{i}.safetensors" for i, old in enumerate(sorted(set(index["weight_map"].values())))}
    assert len(renamed) > 2
    index["weight_map"] = {name: renamed[file] for name, file in index["weight_map"].items()}
    files = {renamed.get(name, name): data for name, data in files.items()}
    online["remote"]["org/sharded"] = {**files, "model.safetensors.index.json": json.dumps(index).encode()}
    loaded = modelio.load(Path("hf:org/sharded"))
    assert [c["allow_patterns"] for c in online["calls"][2:]] == [sorted(renamed.values())]  # the shards only
    assert online["calls"][2]["revision"] == MAIN  # pinned to the commit the first download resolved
    reference = {}
    for shard in renamed.values():
        reference.update(load_file(tmp_path / "sharded" / next(k for k, v in renamed.items() if v == shard)))
    assert np.array_equal(np.asarray(loaded.params["embed_tokens"]), reference["model.embed_tokens.weight"])


def test_a_hub_model_without_safetensors_is_refused_without_fetching_pickles(online):
    online["remote"]["org/pickled"] = {"config.json": b"{}", "pytorch_model.bin": b"never fetched"}
    with pytest.raises(UserError, match="hf:org/pickled has no safetensors weights on the Hub.*never loads pickle"):
        modelio.locate(Path("hf:org/pickled"))
    snapshot = online["cache"] / "models--org--pickled" / "snapshots" / MAIN
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json"]


def test_a_partial_cached_copy_the_hub_did_not_complete_is_not_blamed_on_the_hub(online):
    """Without a connection, huggingface_hub hands back the cached snapshot as if the Hub had answered: a copy
    cached without its weights must not read as "the Hub has no safetensors"."""
    add_snapshot(online["cache"], "org/partial", MAIN, {"config.json": b"{}"}, ("main",))
    online["remote"]["org/partial"] = {"config.json": b"{}"}  # what the fallback returns: the same snapshot
    with pytest.raises(UserError, match=r"the cached copy \(.*\) has no model.safetensors, and none came from the Hub"):
        modelio.locate(Path("hf:org/partial"))
