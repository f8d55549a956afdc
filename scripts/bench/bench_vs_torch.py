#!/usr/bin/env python3
"""bigmodel's train step against the PyTorch eager peer, interleaved in one session on this CPU.

For each config (tiny, 35m) and each round it runs, one after the other:
  A  the real CLI:  python -m bigmodel_cli --quiet pretrain recipes/bench/<cfg>.toml --run-dir <tmp>
                    --set train.steps=<steps + 2> --set train.log_every=1
     and reads the per-step tokens_per_s from <tmp>/metrics.jsonl (the first 2 steps are warm-up);
  B  the peer:      python ../shared/bench/torch_peer.py <cfg> <steps> eager <peak GFLOP/s>
     which runs 2 warm-up steps and then <steps> timed ones.
Both report the median step time of their timed steps; tokens/s = B*T / median step time. The matmul peak
(best fp32 square matmul through jax, measured first; torch's own rate is recorded beside it) goes to the
peer, and both fractions of peak use its FLOP formula: 6*(params - embedding)*tokens + 12*B*T^2*d*layers.

Both subprocesses get GLIBC_TUNABLES (see STACK-NOTES) unless --no-tunables, which also sets
BIGMODEL_NO_REEXEC=1. Each run records how many cores other processes kept busy meanwhile ("others", from
/proc/stat minus the child's own CPU time); --retry-busy N reruns a round where that passed --busy-limit, and
--wait-idle S first waits up to S s for a quiet CPU. On a shared machine: --wait-idle 900 --retry-busy 3.

Usage:
  python scripts/bench/bench_vs_torch.py --rounds 3 [--configs tiny,35m] [--steps N] [--json-out FILE]
  python scripts/bench/bench_vs_torch.py --dry-run      # print the commands and exit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # this checkout's bigmodel_cli, not an installed one

RECIPES = REPO / "recipes" / "bench"
DEFAULT_PEER = REPO.parent / "shared" / "bench" / "torch_peer.py"
TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1"
WARMUP_STEPS = 2  # the peer also runs two untimed steps before its timed ones
DEFAULT_STEPS = {"tiny": 30, "35m": 8}
CONFIGS = ("tiny", "35m")


# ---- commands and environment -----------------------------------------------------------------


def peer_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("BIGMODEL_TORCH_PEER") or DEFAULT_PEER)


def bigmodel_cmd(cfg: str, steps: int, run_dir: str) -> list[str]:
    recipe, steps_set = str(RECIPES / f"{cfg}.toml"), f"train.steps={steps + WARMUP_STEPS}"
    cli = [sys.executable, "-m", "bigmodel_cli", "--quiet", "pretrain", recipe, "--run-dir", run_dir]
    return [*cli, "--set", steps_set, "--set", "train.log_every=1"]


def peer_cmd(peer: Path, cfg: str, steps: int, peak_gflops: float | None) -> list[str]:
    peak = "<peak>" if peak_gflops is None else f"{peak_gflops:.1f}"
    return [sys.executable, str(peer), cfg, str(steps), "eager", peak]


def child_env(tunables: bool) -> dict[str, str]:
    """The environment of both subprocesses: one real CPU device, and the malloc tunables."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.setdefault("JAX_PLATFORMS", "cpu")
    if tunables:
        env["GLIBC_TUNABLES"] = TUNABLES
    else:
        env.pop("GLIBC_TUNABLES", None)
        env["BIGMODEL_NO_REEXEC"] = "1"  # else the CLI re-executes itself with the tunables on a CPU host
    return env


def shown(cmd: list[str], tunables: bool) -> str:
    prefix = f"GLIBC_TUNABLES={TUNABLES} " if tunables else "BIGMODEL_NO_REEXEC=1 "
    return prefix + " ".join(shlex.quote(c) for c in cmd)


# ---- model arithmetic (the peer's formula) ------------------------------------------------------


def dims(cfg_name: str) -> dict:
    """The recipe's dimensions, read through bigmodel's own config loader."""
    from bigmodel_cli.config import load_config

    cfg = load_config(RECIPES / f"{cfg_name}.toml")
    m = cfg.model
    return dict(
        vocab=m.vocab_size,
        d=m.d_model,
        layers=m.n_layers,
        heads=m.n_heads,
        ffn=m.d_ff,
        T=cfg.data.seq_len or m.max_seq_len,
        B=cfg.train.batch_size,
    )


def peer_params(c: dict) -> int:
    """Parameter count of torch_peer.Model: embedding, per block 4 d^2 + 3 d f + 2 norms, final norm, head."""
    per_block = 4 * c["d"] * c["d"] + 3 * c["d"] * c["ffn"] + 2 * c["d"]
    return c["vocab"] * c["d"] + c["layers"] * per_block + c["d"] + c["d"] * c["vocab"]


def flops_per_step(c: dict) -> float:
    tokens = c["B"] * c["T"]
    return 6 * (peer_params(c) - c["vocab"] * c["d"]) * tokens + 12 * c["B"] * c["T"] ** 2 * c["d"] * c["layers"]


# ---- measurements -------------------------------------------------------------------------------


def matmul_peak_gflops(sizes=(1024, 2048), reps: int = 6) -> dict:
    """Best fp32 square-matmul rate through jax: the practical peak of this CPU."""
    import jax
    import jax.numpy as jnp

    matmul = jax.jit(lambda a, b: a @ b)
    best = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        matmul(a, b).block_until_ready()
        fastest = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            matmul(a, b).block_until_ready()
            fastest = min(fastest, time.perf_counter() - t0)
        best[n] = 2 * n**3 / fastest / 1e9
    return {"gflops": max(best.values()), "by_size": {str(n): round(g, 1) for n, g in best.items()}}


# On an AMD host torch's MKL runs 256-bit kernels and XLA's YNNPACK the full AVX-512 width: that gap is most of
# a ratio there (docs/benchmarks.md, "No AVX2 stand-in on an AVX-512 host"), so the JSON keeps both rates.
_TORCH_MATMUL = """
import json, sys, time, torch
best = {}
for n in json.loads(sys.argv[1]):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    fastest = float("inf")
    for _ in range(int(sys.argv[2])):
        t0 = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - t0)
    best[str(n)] = round(2 * n**3 / fastest / 1e9, 1)
print(json.dumps({"gflops": max(best.values()), "by_size": best, "torch": torch.__version__}))
"""


def peer_matmul_gflops(env: dict, sizes=(1024, 2048), reps: int = 6) -> dict:
    """Best fp32 square-matmul rate through torch, in a subprocess with the peer's environment."""
    cmd = [sys.executable, "-c", _TORCH_MATMUL, json.dumps(list(sizes)), str(reps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        _fail("the torch matmul probe", proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _busy_seconds() -> float | None:
    """CPU-seconds all cores have spent busy since boot (Linux /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_idle(limit_cores: float, max_wait_s: float) -> float:
    """Wait (at most max_wait_s) until other processes use under limit_cores for 3 s; returns the wait."""
    t_start = time.perf_counter()
    quiet = 0
    while time.perf_counter() - t_start < max_wait_s:
        before = _busy_seconds()
        if before is None:
            return 0.0
        time.sleep(1.0)
        quiet = quiet + 1 if (_busy_seconds() - before) < limit_cores else 0
        if quiet >= 3:
            break
    return time.perf_counter() - t_start


def run_measured(cmd: list[str], env: dict, cwd: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run cmd; return it with wall time, its own CPU time and the cores other processes used meanwhile."""
    before_busy, before_child = _busy_seconds(), os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after_busy, after_child = _busy_seconds(), os.times()
    own = (after_child.children_user - before_child.children_user) + (
        after_child.children_system - before_child.children_system
    )
    info = {"wall_s": round(wall, 2), "cpu_s": round(own, 2)}
    if before_busy is not None and after_busy is not None and wall > 0:
        info["others_cores"] = round(max(0.0, (after_busy - before_busy - own) / wall), 2)
    return proc, info


def _fail(what: str, proc: subprocess.CompletedProcess) -> None:
    sys.stderr.write(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n")
    raise SystemExit(1)


def run_bigmodel(cfg: str, steps: int, env: dict, c: dict, peak_gflops: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{cfg}-") as tmp:
        run_dir = str(Path(tmp) / "run")  # fresh every time: an existing run dir would resume
        proc, info = run_measured(bigmodel_cmd(cfg, steps, run_dir), env, REPO)
        if proc.returncode != 0:
            _fail(f"bigmodel pretrain {cfg}", proc)
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    tokens = c["B"] * c["T"]
    timed = [r for r in records if r["step"] > WARMUP_STEPS and r.get("tokens_per_s")]
    if not timed:
        raise SystemExit(f"bigmodel {cfg}: no timed steps in metrics.jsonl (got {len(records)} records)")
    step_s = [tokens / r["tokens_per_s"] for r in timed]  # log_every=1: each window is one step
    med = statistics.median(step_s)
    flops = flops_per_step(c)
    return {
        "fw": "bigmodel",
        "step_ms": round(med * 1e3, 1),
        "step_ms_all": [round(s * 1e3, 1) for s in step_s],
        "tokens_per_s": round(tokens / med),
        "gflop_per_step": round(flops / 1e9, 2),
        "achieved_gflops": round(flops / med / 1e9, 1),
        "fraction_of_peak": round(flops / med / 1e9 / peak_gflops, 3),
        "mfu_reported": round(statistics.median(r["mfu"] for r in timed), 3) if "mfu" in timed[0] else None,
        "first_steps_ms": [round(tokens / r["tokens_per_s"] * 1e3, 1) for r in records[:WARMUP_STEPS]],
        "loss_first": round(records[0]["loss"], 3),
        "loss_last": round(records[-1]["loss"], 3),
        **info,
    }


def run_peer(peer: Path, cfg: str, steps: int, env: dict, peak_gflops: float) -> dict:
    proc, info = run_measured(peer_cmd(peer, cfg, steps, peak_gflops), env, REPO)
    if proc.returncode != 0:
        _fail(f"torch peer {cfg}", proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        _fail(f"torch peer {cfg} (no JSON line)", proc)
    return {**json.loads(lines[-1]), **info}


# ---- reporting ----------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def fmt_spread(s: dict, fmt: str) -> str:
    return f"{s['min']:{fmt}} – {s['median']:{fmt}} – {s['max']:{fmt}}"


def summarise(name: str, rounds: list[dict]) -> dict:
    out = {}
    for fw in ("bigmodel", "torch"):
        runs = [r[fw] for r in rounds]
        out[fw] = {
            "tokens_per_s": spread([r["tokens_per_s"] for r in runs]),
            "step_ms": spread([r["step_ms"] for r in runs]),
            "fraction_of_peak": spread([r["fraction_of_peak"] for r in runs]),
            "others_cores_max": max((r.get("others_cores", 0.0) for r in runs), default=0.0),
        }
    ratios = [r["bigmodel"]["tokens_per_s"] / r["torch"]["tokens_per_s"] for r in rounds]
    out["ratio_bigmodel_over_torch"] = {k: round(v, 3) for k, v in spread(ratios).items()}
    out["ratios"] = [round(x, 3) for x in ratios]
    return out


def table(summary: dict, host: dict) -> str:
    """The per-framework table, then the ratios with the host kind beside them (figures differ by host kind)."""
    from bigmodel_cli.utils import host_kind

    head = (
        "| config | framework | tokens/s (min – median – max) | step ms (median) | fraction of peak (median) "
        "| others' cores (max) |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        for fw, label in (("bigmodel", "bigmodel (JAX)"), ("torch", "PyTorch eager")):
            f = s[fw]
            lines.append(
                f"| {name} | {label} | {fmt_spread(f['tokens_per_s'], ',.0f')} "
                f"| {f['step_ms']['median']:,.1f} | {f['fraction_of_peak']['median']:.3f} "
                f"| {f['others_cores_max']:.2f} |"
            )
    lines.append("")
    lines.append(
        "| config | host | bigmodel / PyTorch eager tokens/s (min – median – max over paired rounds) | per round |"
    )
    lines.append("|---|---|---|---|")
    kind = host_kind(host)  # with the x86 family: Zen 4 and Zen 5 are both AVX-512 and differ 2x here
    for name, s in summary.items():
        r = s["ratio_bigmodel_over_torch"]
        per = ", ".join(f"{x:.2f}" for x in s["ratios"])
        lines.append(f"| {name} | {kind} | {r['min']:.2f} – {r['median']:.2f} – {r['max']:.2f} × | {per} |")
    return "\n".join(lines)


def machine_info() -> dict:
    """The host (bigmodel_cli.utils.describe_host: CPU model, cores, AVX2 or AVX-512) and the versions measured."""
    import jax

    from bigmodel_cli.utils import describe_host

    return {
        **describe_host(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", ""),
    }


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: tiny,35m (default both)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved A/B pairs per config (default 3)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed steps per run, after {WARMUP_STEPS} warm-up steps (default {DEFAULT_STEPS})",
    )
    p.add_argument("--peer", default=None, help=f"torch_peer.py (default $BIGMODEL_TORCH_PEER or {DEFAULT_PEER})")
    p.add_argument("--peak", type=float, default=None, help="matmul peak GFLOP/s (default: measure it first)")
    p.add_argument("--json-out", type=Path, default=None, help="write all results to this JSON file")
    p.add_argument("--no-tunables", action="store_true", help="do not set GLIBC_TUNABLES in the subprocesses")
    p.add_argument("--retry-busy", type=int, default=0, help="rerun a round up to N times if others were busy")
    p.add_argument(
        "--wait-idle", type=float, default=0, help="before each round, wait up to this many s for a quiet CPU"
    )
    p.add_argument("--busy-limit", type=float, default=0.25, help="cores of other work that make a round busy")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in args.configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}: choose from {', '.join(CONFIGS)}")
    if args.rounds < 1 or (args.steps is not None and args.steps < 1):
        p.error("--rounds and --steps must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tunables = not args.no_tunables
    peer = peer_path(args.peer)
    steps_for = {c: args.steps or DEFAULT_STEPS[c] for c in args.configs}

    if args.dry_run:
        print(f"# {args.rounds} round(s) per config, interleaved bigmodel / torch; matmul peak measured first")
        for c in args.configs:
            print(f"# {c}")
            print(shown(bigmodel_cmd(c, steps_for[c], "<tmp>/run"), tunables))
            print(shown(peer_cmd(peer, c, steps_for[c], args.peak), tunables))
        if not peer.is_file():
            print(f"# note: {peer} does not exist", file=sys.stderr)
        return 0

    if not peer.is_file():
        raise SystemExit(f"the torch peer {peer} does not exist: pass --peer or set BIGMODEL_TORCH_PEER")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from bigmodel_cli.utils import host_line

    env = child_env(tunables)
    info = machine_info()
    if args.peak is None:
        if args.wait_idle:
            wait_idle(args.busy_limit, args.wait_idle)
        peak = matmul_peak_gflops()
        peak_gflops = peak["gflops"]
    else:
        peak, peak_gflops = {"gflops": args.peak, "by_size": "given"}, args.peak
    peer_peak = peer_matmul_gflops(env)
    print(
        f"# {host_line(info)} | jax {info['jax']} | "
        f"matmul peak {peak_gflops:.1f} GFLOP/s {peak['by_size']} (torch's matmul: {peer_peak['gflops']:.1f} "
        f"{peer_peak['by_size']}) | tunables {'on' if tunables else 'off'}"
    )

    results: dict = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": info,
        "peak": peak,
        "peer_matmul": peer_peak,
        "tunables": TUNABLES if tunables else None,
        "steps": steps_for,
        "warmup_steps": WARMUP_STEPS,
        "configs": {},
    }
    summary = {}
    for c in args.configs:
        d = dims(c)
        rounds = []
        for i in range(args.rounds):
            for attempt in range(args.retry_busy + 1):
                if args.wait_idle:
                    waited = wait_idle(args.busy_limit, args.wait_idle)
                    if waited > 5:
                        print(f"  waited {waited:.0f} s for the CPU to go quiet", flush=True)
                a = run_bigmodel(c, steps_for[c], env, d, peak_gflops)
                b = run_peer(peer, c, steps_for[c], env, peak_gflops)
                if abs(b["gflop_per_step"] - a["gflop_per_step"]) > 0.01 * a["gflop_per_step"]:
                    raise SystemExit(
                        f"{c}: FLOPs disagree with the peer ({a['gflop_per_step']} vs {b['gflop_per_step']})"
                    )
                busy = max(a.get("others_cores", 0.0), b.get("others_cores", 0.0))
                pair = {"round": i + 1, "attempt": attempt + 1, "bigmodel": a, "torch": b}
                print(
                    f"{c} round {i + 1}: bigmodel {a['tokens_per_s']:,} tok/s ({a['step_ms']} ms) | "
                    f"torch {b['tokens_per_s']:,} tok/s ({b['step_ms']} ms) | "
                    f"ratio {a['tokens_per_s'] / b['tokens_per_s']:.2f} | others {busy:.2f} cores",
                    flush=True,
                )
                if busy <= args.busy_limit or attempt == args.retry_busy:
                    break
                print(f"  others used {busy:.2f} cores: rerunning round {i + 1}", flush=True)
            rounds.append(pair)
        summary[c] = summarise(c, rounds)
        results["configs"][c] = {"dims": d, "rounds": rounds, "summary": summary[c]}
        results["torch_version"] = rounds[0]["torch"].get("torch")
    print()
    print(
        f"{host_line(info)}; matmul peak {peak_gflops:.1f} GFLOP/s (torch's matmul {peer_peak['gflops']:.1f}); "
        f"torch {results.get('torch_version')}; "
        f"jax {info['jax']}"
    )
    print(table(summary, info))
    results["table_markdown"] = table(summary, info)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
