"""The bad-input matrix: every case exits non-zero with one line naming the input and the fix, no traceback,
and leaves no partial output behind."""

import json
import shutil

import pytest

from tests.conftest import REPO, pretrain_args, synthetic_text

TINY = REPO / "recipes" / "tiny.toml"


@pytest.fixture(scope="module")
def world(cli, tiny_data, tmp_path_factory) -> dict:
    """Inputs the cases start from: a trained run, a second tokenizer's data, task files, odd files."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    cli(*pretrain_args(run, tiny_data, {"train.steps": 2, "checkpoint.every": 2}))
    (root / "other.txt").write_text("completely different text, other characters: XYZ 0123\n" * 200)
    cli("preprocess", root / "other.txt", "--out", root / "other_data", "--model-type", "char")
    (root / "text.txt").write_text(synthetic_text(50))
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(b"abc\x00\x01\x02" * 10)
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (root / "nofield.jsonl").write_text('{"body": "x"}\n')
    (root / "not_a_model.model").write_text("not sentencepiece")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("the user's file")
    (root / "no_text_dir").mkdir()
    (root / "no_text_dir" / "image.png").write_bytes(b"\x89PNG")
    (root / "a_file").write_text("x")
    (root / "noqas.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "c"}]}]}))
    (root / "cls.tsv").write_text("text\tlabel\n" + "".join(f"the film was {w}\t{w}\n" for w in ("fine", "dull") * 6))
    (root / "cls_new.tsv").write_text("text\tlabel\nthe film was odd\tstrange\n")
    (root / "hf_pickle").mkdir()
    (root / "hf_pickle" / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    (root / "hf_pickle" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    alien = root / "alien"  # a checkpoint whose config.toml claims another architecture
    shutil.copytree(run, alien)
    text = (alien / "config.toml").read_text().replace("d_model = 128", "d_model = 64")
    (alien / "config.toml").write_text(text)
    recipes = {
        "syntax": "[train\nsteps = 3\n",
        "unknown_key": "[optim]\nlearning_rate = 1e-3\n",
        "unknown_section": "[optimiser]\nlr = 1e-3\n",
        "wrong_type": '[train]\nsteps = "ten"\n',
    }
    for name, text in recipes.items():
        (root / f"{name}.toml").write_text(text)
    classify_run = root / "cls_run"
    cli(
        "finetune",
        "--task",
        "classify",
        "--init-from",
        run,
        "--data",
        root / "cls.tsv",
        "--run-dir",
        classify_run,
        "--set",
        "train.steps=1",
        "--set",
        "train.batch_size=8",
        "--set",
        "task.max_target_tokens=8",
        "--set",
        "data.seq_len=64",
        "--set",
        "task.label_names=",
    )
    return {"root": root, "run": run, "data": tiny_data, "cls_run": classify_run}


def _pretrain(w, *sets, run_dir="new_run"):
    args = ["pretrain", TINY, "--run-dir", w["root"] / run_dir, "--set", f"data.path={w['data']}"]
    for s in sets:
        args += ["--set", s]
    return args


# name -> (argv builder, text the error must contain, path that must not appear)
CASES = {
    "recipe_missing": (lambda w: ["pretrain", w["root"] / "nope.toml"], "not found", None),
    "recipe_is_directory": (lambda w: ["pretrain", w["root"] / "full"], "not found", None),
    "toml_syntax_error": (lambda w: ["pretrain", w["root"] / "syntax.toml"], "not valid TOML", None),
    "unknown_key": (lambda w: ["pretrain", w["root"] / "unknown_key.toml"], "did you mean 'lr'", None),
    "unknown_section": (lambda w: ["pretrain", w["root"] / "unknown_section.toml"], "did you mean 'optim'", None),
    "wrong_type": (lambda w: ["pretrain", w["root"] / "wrong_type.toml"], "train.steps must be int", None),
    "negative_lr": (lambda w: _pretrain(w, "optim.lr=-1"), "optim.lr must be positive", "new_run"),
    "zero_steps": (lambda w: _pretrain(w, "train.steps=0"), "train.steps must be positive", "new_run"),
    "bad_attention": (lambda w: _pretrain(w, "model.attention=flash"), "model.attention must be one of", "new_run"),
    "negative_chunks": (lambda w: _pretrain(w, "model.attention_chunks=-2"), "attention_chunks must be 0", "new_run"),
    "cudnn_without_gpu": (lambda w: _pretrain(w, "model.attention=cudnn"), '"cudnn" needs an NVIDIA GPU', "new_run"),
    "unknown_optimizer": (
        lambda w: _pretrain(w, "optim.name=lion"),
        "optim.name must be one of adamw, muon",
        "new_run",
    ),
    "zero_batch": (lambda w: _pretrain(w, "train.batch_size=0"), "train.batch_size must be positive", "new_run"),
    "batch_not_divisible": (lambda w: _pretrain(w, "train.batch_size=12"), "multiple of 8", None),
    "mesh_mismatch": (lambda w: _pretrain(w, "mesh.data=3"), "product is 8", None),
    "seq_len_too_long": (lambda w: _pretrain(w, "data.seq_len=1000"), "exceeds model.max_seq_len", "new_run"),
    "data_missing": (lambda w: _pretrain(w, "data.path=/nonexistent"), "run bigmodel preprocess", "new_run"),
    "data_not_preprocessed": (lambda w: _pretrain(w, f"data.path={w['root'] / 'full'}"), "no manifest.json", "new_run"),
    "vocab_larger_than_model": (lambda w: _pretrain(w, "model.vocab_size=5"), "smaller than the data's", "new_run"),
    "run_dir_unwritable": (lambda w: _pretrain(w, run_dir="a_file/run"), "cannot create run directory", None),
    "preprocess_missing_input": (
        lambda w: ["preprocess", w["root"] / "nope.txt", "--out", w["root"] / "p1"],
        "not found",
        "p1",
    ),
    "preprocess_dir_without_text": (
        lambda w: ["preprocess", w["root"] / "no_text_dir", "--out", w["root"] / "p2"],
        "no .txt",
        "p2",
    ),
    "preprocess_empty_corpus": (
        lambda w: ["preprocess", w["root"] / "empty.txt", "--out", w["root"] / "p3"],
        "no text",
        "p3",
    ),
    "preprocess_binary": (
        lambda w: ["preprocess", w["root"] / "binary.txt", "--out", w["root"] / "p4"],
        "binary",
        "p4",
    ),
    "preprocess_not_utf8": (
        lambda w: ["preprocess", w["root"] / "latin1.txt", "--out", w["root"] / "p5"],
        "UTF-8",
        "p5",
    ),
    "preprocess_bad_jsonl_line": (
        lambda w: ["preprocess", w["root"] / "bad.jsonl", "--out", w["root"] / "p6"],
        "bad.jsonl:2",
        "p6",
    ),
    "preprocess_missing_field": (
        lambda w: ["preprocess", w["root"] / "nofield.jsonl", "--out", w["root"] / "p7"],
        "'text'",
        "p7",
    ),
    "preprocess_out_not_empty": (
        lambda w: ["preprocess", w["root"] / "text.txt", "--out", w["root"] / "full"],
        "not empty",
        None,
    ),
    "preprocess_bad_model_type": (
        lambda w: ["preprocess", w["root"] / "text.txt", "--out", w["root"] / "p8", "--model-type", "wordpiece"],
        "model-type",
        "p8",
    ),
    "preprocess_bad_val_fraction": (
        lambda w: ["preprocess", w["root"] / "text.txt", "--out", w["root"] / "p9", "--val-fraction", "1.5"],
        "val-fraction",
        "p9",
    ),
    "preprocess_bad_tokenizer": (
        lambda w: [
            "preprocess",
            w["root"] / "text.txt",
            "--out",
            w["root"] / "p10",
            "--tokenizer",
            w["root"] / "not_a_model.model",
        ],
        "SentencePiece",
        "p10",
    ),
    "evaluate_missing_model": (lambda w: ["evaluate", w["root"] / "nothing"], "not found", None),
    "evaluate_not_a_run": (lambda w: ["evaluate", w["root"] / "full"], "not a run directory", None),
    "evaluate_tokenizer_mismatch": (
        lambda w: ["evaluate", w["run"], "--data", w["root"] / "other_data"],
        "different tokenizer",
        None,
    ),
    "checkpoint_other_architecture": (lambda w: ["evaluate", w["root"] / "alien"], "does not fit", None),
    "export_not_empty": (lambda w: ["export", w["run"], "--out", w["root"] / "full"], "not empty", None),
    "export_bad_format": (
        lambda w: ["export", w["run"], "--out", w["root"] / "e1", "--format", "onnx"],
        "--format",
        "e1",
    ),
    "generate_too_long": (
        lambda w: ["generate", w["run"], "--prompt", "x" * 60, "--max-new-tokens", "100"],
        "exceeds the model's",
        None,
    ),
    "generate_negative_temperature": (lambda w: ["generate", w["run"], "--temperature", "-1"], "temperature", None),
    "generate_raw_on_a_base_model": (
        lambda w: ["generate", w["run"], "--raw"],
        "--raw applies to models finetuned",
        None,
    ),
    "finetune_unknown_task": (
        lambda w: ["finetune", "--task", "poetry", "--init-from", w["run"], "--data", w["root"] / "text.txt"],
        "unknown task",
        None,
    ),
    "finetune_qa_without_qas": (
        lambda w: [
            "finetune",
            "--task",
            "qa",
            "--init-from",
            w["run"],
            "--data",
            w["root"] / "noqas.json",
            "--run-dir",
            w["root"] / "f1",
        ],
        "qas",
        "f1",
    ),
    "finetune_muon_with_lora": (
        lambda w: [
            "finetune",
            "--task",
            "classify",
            "--init-from",
            w["run"],
            "--data",
            w["root"] / "cls.tsv",
            "--run-dir",
            w["root"] / "f2",
            "--set",
            "optim.name=muon",
            "--set",
            "lora.rank=4",
        ],
        "not LoRA adapters",
        "f2",
    ),
    "finetune_missing_init": (
        lambda w: ["finetune", "--task", "classify", "--data", w["root"] / "cls.tsv"],
        "--init-from",
        None,
    ),
    "classify_label_unseen": (
        lambda w: ["evaluate", w["cls_run"], "--task", "classify", "--data", w["root"] / "cls_new.tsv"],
        "never seen in training",
        None,
    ),
    "hf_pickle_refused": (
        lambda w: ["evaluate", f"hf:{w['root'] / 'hf_pickle'}", "--data", w["data"]],
        "safetensors",
        None,
    ),
    "pretrain_rules_two_dimensions_on_one_axis": (
        lambda w: [
            "pretrain",
            TINY,
            "--run-dir",
            w["root"] / "r_rules",
            "--set",
            f"data.path={w['data']}",
            "--set",
            "mesh.data=2",
            "--set",
            "mesh.tensor=4",
            "--set",
            "mesh.rules=embed=tensor",
        ],
        "two dimensions of a parameter",
        "r_rules",
    ),  # fmt: skip
    "plan_mesh_mismatch": (
        lambda w: ["plan", TINY, "--set", "model.vocab_size=64", "--set", "mesh.tensor=3"],
        "devices",
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(cli, world, name):
    build, expected, must_not_exist = CASES[name]
    result = cli(*build(world), ok=False)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert result.exit_code != 0, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output + result.stderr
    if must_not_exist:
        assert not (world["root"] / must_not_exist).exists()


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_disk_full_while_exporting_leaves_nothing(cli, world, monkeypatch):
    import errno

    import safetensors.numpy

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", no_space)
    out = world["root"] / "exports" / "full_disk"
    result = cli("export", world["run"], "--out", out, ok=False)
    assert result.exit_code != 0 and "No space left on device" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".full_disk")]
    assert (world["root"] / "full" / "keep.txt").read_text() == "the user's file"  # nothing of the user's lost
