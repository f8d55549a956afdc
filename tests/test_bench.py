"""The CPU benchmark against the PyTorch peer: matching recipes, the script's commands, a real run."""

import ast
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from bigmodel_cli.config import load_config
from bigmodel_cli.model.sizing import count_params, flops_per_token
from bigmodel_cli.utils import describe_host, host_line
from tests.conftest import REPO, run_cli_subprocess

PEER = REPO.parent / "shared" / "bench" / "torch_peer.py"
SCRIPT = REPO / "scripts" / "bench" / "bench_vs_torch.py"
# The peer's configurations, for when ../shared/bench/torch_peer.py is not there to read them from.
PEER_CONFIGS = {
    "tiny": dict(vocab=8000, d=128, layers=2, heads=4, ffn=512, T=128, B=8),
    "35m": dict(vocab=8000, d=512, layers=8, heads=8, ffn=1536, T=512, B=8),
}


def peer_configs() -> dict:
    """CONFIGS as written in torch_peer.py (parsed, not imported: no torch needed), else the constants."""
    if not PEER.is_file():
        return PEER_CONFIGS
    tree = ast.parse(PEER.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CONFIGS" for t in node.targets):
            return {
                ast.literal_eval(k): {kw.arg: ast.literal_eval(kw.value) for kw in v.keywords}
                for k, v in zip(node.value.keys, node.value.values, strict=True)
            }
    raise AssertionError(f"no CONFIGS in {PEER}")


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_vs_torch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["tiny", "35m"])
def test_bench_recipe_matches_peer(name):
    cfg = load_config(REPO / "recipes" / "bench" / f"{name}.toml")
    want = peer_configs()[name]
    m = cfg.model
    got = dict(
        vocab=m.vocab_size,
        d=m.d_model,
        layers=m.n_layers,
        heads=m.n_heads,
        ffn=m.d_ff,
        T=cfg.data.seq_len or m.max_seq_len,
        B=cfg.train.batch_size,
    )
    assert got == want
    assert m.kv_heads == m.n_heads and m.dims_per_head * m.n_heads == m.d_model  # plain multi-head attention
    assert not m.tie_embeddings and m.dtype == m.param_dtype == "float32" and m.norm_eps == 1e-6
    assert cfg.data.synthetic and m.max_seq_len == want["T"]
    o = cfg.optim
    assert (o.lr, o.b1, o.b2, o.weight_decay, o.eps) == (3e-3, 0.9, 0.95, 0.1, 1e-8)
    assert o.grad_clip == 0 and o.warmup_steps == 0 and o.min_lr_ratio == 1.0  # the peer's constant-lr AdamW
    assert cfg.train.log_every == 1 and cfg.checkpoint.every >= 1000


@pytest.mark.parametrize("name", ["tiny", "35m"])
def test_bench_flops_agree_with_model(name):
    """The script's copy of the peer's FLOP formula equals bigmodel's own count for the same model."""
    bench = bench_module()
    cfg = load_config(REPO / "recipes" / "bench" / f"{name}.toml")
    d = bench.dims(name)
    assert bench.peer_params(d) == count_params(cfg.model)[0]
    tokens = d["B"] * d["T"]
    assert bench.flops_per_step(d) == pytest.approx(flops_per_token(cfg.model, d["T"]) * tokens)


def test_bench_script_dry_run(tmp_path):
    peer = tmp_path / "peer.py"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--rounds", "2", "--steps", "4", "--peer", str(peer)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("tiny", "35m"):
        ours = [x for x in lines if f"recipes/bench/{name}.toml" in x]
        theirs = [x for x in lines if str(peer) in x and f" {name} 4 eager" in x]
        assert len(ours) == 1 and len(theirs) == 1, proc.stdout
        assert "-m bigmodel_cli --quiet pretrain" in ours[0] and "train.steps=6" in ours[0]
        assert "train.log_every=1" in ours[0]
        assert ours[0].startswith("GLIBC_TUNABLES=") and theirs[0].startswith("GLIBC_TUNABLES=")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--configs", "tiny", "--no-tunables"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0 and "GLIBC_TUNABLES" not in proc.stdout and "35m" not in proc.stdout


def test_bench_tiny_pretrain_logs_speed(tmp_path):
    run_dir = tmp_path / "run"
    run_cli_subprocess(
        "--quiet",
        "pretrain",
        REPO / "recipes" / "bench" / "tiny.toml",
        "--run-dir",
        run_dir,
        "--set",
        "train.steps=3",
        env={"XLA_FLAGS": ""},
        timeout=300,
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1.5
        assert abs(r["loss"] - 8.99) < 0.3  # random tokens: ~ln(8000)


def test_chunked_attention_never_builds_the_full_score_matrix():
    # The compiled train step itself: the chunked kernel leaves no [B,H,T,T] tensor and no matmul off
    # XLA:CPU's fast path, and does less work than the masked full-matrix attention.
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench" / "hlo_attention.py"), "--json",
         "--recipe", str(REPO / "recipes" / "bench" / "tiny.toml")],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=True,
    )  # fmt: skip
    results = {r["attention"]: r for r in map(json.loads, proc.stdout.splitlines())}
    chunked, xla = results["chunked"], results["xla"]
    assert chunked["chunks"] == 2 and chunked["full_score_tensors"] == 0 and xla["full_score_tensors"] > 0
    assert chunked["slow_dots"] == 0 and xla["slow_dots"] == 0
    assert chunked["gflop_per_step"] < xla["gflop_per_step"]


@pytest.mark.slow
def test_bench_load_compares_bigmodel_with_transformers_on_a_tiny_model(tmp_path):
    # --tiny --config llama: a 2-layer Llama saved by transformers in bfloat16, loaded by both sides in fresh
    # processes: the first greedy token agrees, and each side reports its times and peak memory.
    script = REPO / "scripts" / "bench" / "bench_load.py"
    command = [sys.executable, str(script), "--model-dir", str(tmp_path), "--config", "llama", "--tiny"]
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.run([*command, "--repeats", "1", "--cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result, row = json.loads(proc.stdout.splitlines()[0]), proc.stdout.splitlines()[1]
    assert result["model"] == "llama-tiny-bf16" and result["same_first_token"]
    config = json.loads((tmp_path / "llama-tiny-bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] and config["hidden_size"] == 64
    attention = 2 * 64 * 64 + 2 * 64 * 32  # q, o [64,64]; k, v [32,64] (2 of 4 heads' width)
    assert result["weight_bytes"] == 2 * (512 * 64 + 2 * (attention + 3 * 64 * 128 + 2 * 64) + 64)  # tied: no head
    for side in ("bigmodel", "transformers"):
        times = result[side]
        assert 0 < times["import_s"] < times["first_token_s"] and times["load_s"] > 0
        assert times["peak_rss_bytes"] >= times["load_peak_rss_bytes"] > 0
        assert times["rss_over_weights"] == round(times["peak_rss_bytes"] / result["weight_bytes"], 3)
    assert result["bigmodel"]["glibc_tunables"] and not result["transformers"]["glibc_tunables"]
    assert row.startswith("| llama-tiny-bf16 | 0.000 |") and row.count("|") == 8


def test_bench_records_the_host_kind():
    """bench_vs_torch.py's JSON and ratio table say which host kind (AVX2 or AVX-512, cores) each figure is from."""
    bench = bench_module()
    info = bench.machine_info()
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    assert info["isa"] == ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else info["isa"])
    assert info["cores"] == len(os.sched_getaffinity(0)) and info["cpu_model"]
    ratio = {"min": 1.1, "median": 1.2, "max": 1.3}
    side = {"tokens_per_s": ratio, "step_ms": ratio, "fraction_of_peak": ratio, "others_cores_max": 0.0}
    summary = {"tiny": {"bigmodel": side, "torch": side, "ratio_bigmodel_over_torch": ratio, "ratios": [1.2]}}
    rows = bench.table(summary, {**info, "isa": "AVX2", "cores": 2, "cpu_family": ""}).splitlines()
    assert "| config | host |" in rows[-3] and rows[-1].startswith("| tiny | AVX2, 2 cores | 1.10 – 1.20 – 1.30 × |")
    # The x86 family tells AVX-512 hosts apart: Zen 4 (25) and Zen 5 (26) ran 35m at 1.0x and 1.8x torch.
    zen5 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
    zen5 += "flags\t\t: fpu avx2 fma avx512f avx512_bf16\n"
    host = describe_host(zen5)
    assert (host["isa"], host["cpu_family"], host["cpu_model"]) == ("AVX-512", "family 26, model 2", "AMD EPYC")
    assert host_line(host) == f"AMD EPYC (family 26, model 2), AVX-512, {host['cores']} cores"
    rows = bench.table(summary, {**info, **host, "cores": 2}).splitlines()
    assert rows[-1].startswith("| tiny | AVX-512 (family 26, model 2), 2 cores |")


def test_torchs_own_matmul_rate_is_recorded_beside_jaxs(tmp_path, capsys):
    """The peer's matmul rate comes from torch itself, in the peer's environment: on an AMD AVX-512 host it is
    half of jax's, and that gap, not the rest of the step, is most of the ratio there."""
    bench = bench_module()
    probe = bench.peer_matmul_gflops(bench.child_env(tunables=True), sizes=(64, 128), reps=2)
    assert set(probe["by_size"]) == {"64", "128"} and probe["gflops"] == max(probe["by_size"].values()) > 0
    assert probe["torch"].startswith("2.")
    (tmp_path / "torch.py").write_text("raise ImportError('no torch here')\n")  # a host without torch
    env = {**bench.child_env(tunables=False), "PYTHONPATH": str(tmp_path)}
    with pytest.raises(SystemExit):
        bench.peer_matmul_gflops(env, sizes=(64,), reps=1)
    assert "the torch matmul probe failed" in capsys.readouterr().err


def test_the_cpu_peak_behind_mfu_is_the_best_probe_so_far_on_this_host(tmp_path, monkeypatch):
    from bigmodel_cli import utils

    monkeypatch.setattr(utils, "_peak_file", lambda: tmp_path / "cpu_matmul_peak.json")
    utils.measured_matmul_flops.cache_clear()
    first = utils.measured_matmul_flops(n=256, reps=2)
    kept = json.loads((tmp_path / "cpu_matmul_peak.json").read_text())
    assert list(kept.values()) == [first] and host_line() in next(iter(kept))
    # An earlier probe that found more wins over a slow one now (a busy core halves a probe on 2 cores) ...
    (tmp_path / "cpu_matmul_peak.json").write_text(json.dumps({k: v * 1e3 for k, v in kept.items()}))
    utils.measured_matmul_flops.cache_clear()
    assert utils.measured_matmul_flops(n=256, reps=2) == first * 1e3
    # ... and a faster probe replaces the record.
    (tmp_path / "cpu_matmul_peak.json").write_text(json.dumps({k: 1.0 for k in kept}))
    utils.measured_matmul_flops.cache_clear()
    now = utils.measured_matmul_flops(n=256, reps=2)
    assert now > 1.0 and json.loads((tmp_path / "cpu_matmul_peak.json").read_text()) == {next(iter(kept)): now}
    (tmp_path / "cpu_matmul_peak.json").write_text('["not", "a record"]')  # damaged: measured afresh, rewritten
    utils.measured_matmul_flops.cache_clear()
    assert utils.measured_matmul_flops(n=256, reps=2) > 1.0
    assert list(json.loads((tmp_path / "cpu_matmul_peak.json").read_text())) == list(kept)
    utils.measured_matmul_flops.cache_clear()


def test_heap_account_splits_a_runs_peak_memory_by_glibcs_own_figures(tiny_data, tmp_path):
    script = REPO / "scripts" / "bench" / "heap_account.py"
    run = [sys.executable, script, "--every", "2", "--", "--quiet", "pretrain", REPO / "recipes" / "tiny.toml"]
    run += ["--run-dir", tmp_path / "run", "--set", f"data.path={tiny_data}", "--set", "train.steps=3"]
    proc = subprocess.run(list(map(str, run)), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    account = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = account["at_peak"]
    assert account["command"] == "pretrain" and account["samples"] > 10
    assert abs(peak["heap_mb"] + peak["outside_heap_mb"] - account["peak_rss_mb"]) <= 1  # each rounded to MB
    assert 0 < peak["in_use_mb"] <= peak["heap_mb"] <= account["largest_heap_mb"]
    assert peak["in_use_mb"] <= account["most_in_use_mb"] <= account["largest_heap_mb"]
    assert (tmp_path / "run" / "checkpoints").is_dir()  # the command really ran
