"""bench/peers.py run as a user runs it (`python bench/peers.py --smoke --model TINY`): tpv over HTTP and as a
library beside PEFT (prompt-tuning adapters swapped per request) and the bare model's batched generate, then the
many-compositions stream on one replica. The last line must be its JSON with its keys, tpv's outputs equal PEFT's
on the same composed prompts, and each ratio the ratio of the seconds it printed."""

from __future__ import annotations

import statistics

from test_bench_smoke import assert_ratio, bench

SIDES = {"tpv_http", "tpv_library", "peft", "bare_batched"}


def test_peers_smoke(tiny_causal_path):
    out = bench("peers.py", "--model", str(tiny_causal_path), "--profile", "always")
    n = out["requests"]
    assert n == 4 and out["tokens"] == 4 and out["rounds"] == 1
    assert out["peft_mixes_prompt_adapters_in_one_batch"] is False

    # every side ran every round, and first tokens came after the start of the batch
    for task in ("classify", "generate"):
        assert set(out["seconds"][task]) == SIDES
        assert all(len(v) == 1 and v[0] > 0 for v in out["seconds"][task].values()), out["seconds"]
    assert set(out["first_token_ms_p50"]) == SIDES and all(v > 0 for v in out["first_token_ms_p50"].values())

    # the same composed prompts, greedy: the same tokens and label probabilities as PEFT's
    eq = out["outputs_equal"]
    assert eq["all"] is True and eq["rows"] == n, eq
    assert eq["generate_rows_equal_library_vs_peft"] == n and eq["generate_rows_equal_http_vs_library"] == n
    assert eq["classify_max_prob_diff_http_vs_peft"] <= eq["tolerance"]
    assert eq["classify_max_prob_diff_library_vs_peft"] <= eq["tolerance"]
    assert set(out["new_tokens"]) == SIDES - {"tpv_http"}
    assert out["new_tokens"]["tpv_library"] == out["new_tokens"]["peft"] > 0

    # each ratio: the peer's median seconds over tpv's (throughput of tpv over the peer's)
    med = {task: {s: [statistics.median(v)] for s, v in sides.items()} for task, sides in out["seconds"].items()}
    c, g = med["classify"], med["generate"]
    for key, num, den in (("classify_vs_peft", c["peft"], c["tpv_http"]),
                          ("generate_vs_peft", g["peft"], g["tpv_http"]),
                          ("generate_vs_bare_batched", g["bare_batched"], g["tpv_http"]),
                          ("classify_vs_bare_batched", c["bare_batched"], c["tpv_http"]),
                          ("classify_library_vs_peft", c["peft"], c["tpv_library"]),
                          ("generate_library_vs_peft", g["peft"], g["tpv_library"]),
                          ("generate_library_vs_bare_batched", g["bare_batched"], g["tpv_library"])):
        assert_ratio(out[key], num, den)
    assert_ratio(out["http_vs_library"]["classify"], c["tpv_library"], c["tpv_http"])
    assert_ratio(out["http_vs_library"]["generate"], g["tpv_library"], g["tpv_http"])

    # many compositions on one replica whose cache holds fewer of them, beside the same stream naming one
    many = out["many_vs_one_composition"]
    assert many["compositions"] == 12 and many["requests"] == 24 and many["cache_holds_compositions"] == 4
    assert_ratio(many["throughput_ratio"], many["seconds"]["one"], many["seconds"]["many"])
    for name in ("many", "one"):
        assert many[name]["errors"] == 0 and many[name]["hits"] + many[name]["misses"] == many["requests"], many
        assert many[name]["p50_ms"] <= many[name]["p99_ms"]
    # 12 distinct compositions through a cache of 4: each of at least 8 missed, and each miss past 4 evicted one
    assert many["many"]["misses"] >= many["compositions"] - many["cache_holds_compositions"]
    assert many["many"]["evictions"] >= many["many"]["misses"] - many["cache_holds_compositions"]
    assert many["one"]["misses"] <= 1 and many["one"]["hits"] >= many["requests"] - 1
    assert many["cache_max_bytes"] == 4 * many["entry_bytes"] + many["entry_bytes"] // 2
    assert 0 < many["cache_bytes_end"] <= many["cache_max_bytes"] and many["rss_mib_end"] > 0

    # the targets judged on the printed ratios
    targets = out["targets"]
    assert set(targets) == {"classify_vs_peft", "generate_vs_peft", "generate_vs_bare_batched",
                            "many_vs_one_composition"}
    for key, t in targets.items():
        value = many["throughput_ratio"] if key == "many_vs_one_composition" else out[key]
        assert t["value"] == value and t["holds"] is (value >= t["target"]), (key, t)

    # the profile: each side's top ops by self time, largest first, shares of the ops' summed self time
    profile = out["profile"]
    assert set(profile) == {"classify_tpv_library", "classify_peft", "generate_tpv_library", "generate_peft",
                            "generate_bare_batched"}
    for side, prof in profile.items():
        top = prof["top"]
        assert top and prof["wall_s"] > 0 and prof["untraced_s"] >= 0, (side, prof)
        assert [o["self_ms"] for o in top] == sorted((o["self_ms"] for o in top), reverse=True)
        assert 0 < sum(o["share"] for o in top) <= 1 + 1e-3
    assert any(o["op"] in ("aten::mm", "aten::addmm") for o in profile["generate_peft"]["top"])  # the linears
