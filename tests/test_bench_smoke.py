"""Every bench/ script, run as a user runs it (`python bench/X.py --smoke`) on the tiny model and two small user
tasks: it must finish, and its last line must be its JSON with its keys, each ratio the ratio of the seconds it
printed. So a benchmark that rots (an import moved, a renamed field) fails here, not on the next person to run it."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import write_sentiment_task
from tpv.tasks import get_task, register_task

BENCH = Path(__file__).resolve().parents[1] / "bench"
#: one smoke run on the 2-core CI machine takes seconds to a minute; past this it is hung
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> list[str]:
    """Two user tasks persisted under the session's TPV_HOME, which the scripts (and their Ray workers) inherit."""
    folder = tmp_path_factory.mktemp("bench-tasks")
    names = [write_sentiment_task(folder, name) for name in ("bench_smoke_a", "bench_smoke_b")]
    for name in names:
        register_task(get_task(name), overwrite=True, persist=True)
    return names


def bench(script: str, *args: str, timeout_s: float = TIMEOUT_S) -> dict:
    """The last line of `python bench/<script> --smoke ARGS`, parsed as JSON (the run must exit 0)."""
    run = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *args], capture_output=True, text=True,
                         timeout=timeout_s, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    assert run.returncode == 0, f"{script} exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def assert_ratio(ratio: float, numerator: list[float], denominator: list[float], digits: int = 3) -> None:
    """`ratio` (rounded to 3 places) is sum(numerator) / sum(denominator) for some seconds that round to those
    printed (`digits` places): the interval the rounding leaves, no looser."""
    half = 0.5 * 10 ** -digits
    low = max(sum(numerator) - half * len(numerator), 0) / (sum(denominator) + half * len(denominator))
    high = (sum(numerator) + half * len(numerator)) / max(sum(denominator) - half * len(denominator), 1e-9)
    assert low - 5e-4 <= ratio <= high + 5e-4, (ratio, numerator, denominator)


def test_tune_overhead(tiny_causal_path, tasks):
    out = bench("tune_overhead.py", "--model", str(tiny_causal_path), "--tasks", *tasks)
    assert out["trials"] == 2 and out["steps"] == 2 and len(out["serial_s"]) == len(out["tune_s"]) == 1
    assert_ratio(out["tune_vs_serial_wall"], out["tune_s"], out["serial_s"])


def test_grid_throughput(tiny_causal_path, tasks):
    out = bench("grid_throughput.py", "--model", str(tiny_causal_path), "--tasks", *tasks)
    assert out["runs"] == 2 and out["ray"] and set(out["vector_diff_by_side"]) == {"packed"}
    assert_ratio(out["packed_vs_trials_wall"], out["per-run_s"], out["packed_s"])
    assert out["packed_vs_trials_peak_rss"] > 0 and out["max_vector_diff"] <= 1e-4


def test_eval_passes(tiny_causal_path, tasks):
    out = bench("eval_passes.py", "--model", str(tiny_causal_path), "--tasks", *tasks)
    assert out["prompts"] == 2 and out["examples"] == 4
    for shape in ("mixed", "shared"):
        assert_ratio(out[f"{shape}_own_vs_shared"], out[f"{shape}_shared_s"], out[f"{shape}_own_s"])


def test_pack_passes(tiny_causal_path, tasks):
    out = bench("pack_passes.py", "--model", str(tiny_causal_path), "--tasks", *tasks)
    assert out["prompts"] == 2 and out["steps"] == 2 and out["max_vector_diff"] <= 1e-4
    assert_ratio(out["own_passes_vs_shared_pass"], out["shared_pass_s"], out["own_passes_s"])


def test_train_step(tiny_causal_path):
    out = bench("train_step.py", "--backbone", str(tiny_causal_path))
    assert_ratio(out["tpv_vs_peft_step_throughput"], out["peft_s"], out["tpv_s"], digits=6)
    assert_ratio(out["prompt_once_vs_per_row"], out["per_row_s"], out["tpv_s"], digits=6)


def test_serve_batching(tiny_causal_path):
    out = bench("serve_batching.py", "--backbone", str(tiny_causal_path))
    ms = out["batch_ms"]
    for key, mode in (("mixed_vs_single", "single"), ("mixed_vs_per_request", "per_request"),
                      ("mixed_vs_bare_model", "bare")):
        assert_ratio(out[key], [ms[mode]], [ms["mixed"]])
    assert out["max_mixed_vs_per_request_diff"] <= 1e-4 and out["compose_8_vectors_ms"] > 0


def test_serve_generate(tiny_causal_path):
    out = bench("serve_generate.py", "--backbone", str(tiny_causal_path))
    assert out["same_texts"] is True and out["first_token_ms_p50"] > 0
    assert_ratio(out["generate_mixed_vs_per_request"], [out["median_s"]["per_request"]], [out["median_s"]["mixed"]],
                 digits=4)



HOSTILE_P99S = ("unloaded_valid_p99_s", "unloaded_health_p99_s", "flood_valid_p99_s", "flood_health_p99_s",
                "drip_valid_p99_s", "drip_health_p99_s")


def test_serve_load(tiny_causal_path):
    """Every phase once: steady load with malformed requests, a flood of costly bodies and a crowd of drippers
    (health and valid requests measured during each), a model replica killed under load. Two apps and three
    replicas start and one is replaced: minutes on a busy 2-core machine, hence the longer timeout."""
    out = bench("serve_load.py", "--backbone", str(tiny_causal_path), timeout_s=2 * TIMEOUT_S)
    assert out["valid_errors"] == 0 and out["malformed_not_4xx"] == 0 and out["overhead_errors"] == 0
    assert out["errors_during_fault"] == 0 and out["errors_after_recovery"] == 0 and out["recovery_s"] > 0
    assert out["hostile_valid_errors"] == 0 and out["hostile_health_errors"] == 0
    for key in HOSTILE_P99S:
        assert math.isfinite(out[key]) and out[key] > 0, (key, out[key])
    # every costly in-limit body refused with a short 422; drippers beyond the slots cut off (408), no other answer
    assert out["flood_bodies"] == 4 and out["flood_not_422"] == 0
    assert out["drips"] == out["slow_body_slots"] + 4 and out["drip_cut_off"] >= 1 and out["drip_not_408"] == 0
    assert out["split_p50_ms"] > 0 and out["p99_ms"] >= out["p50_ms"] > 0
