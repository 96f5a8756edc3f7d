"""A model split across ranks (mlx.launch, ring backend on loopback) gives what one host gives."""

from __future__ import annotations

import json

import pytest
from daemon_util import assert_nothing_left, env_for, moed, shm_of, status

from moed.daemon.engine.generate import SamplingParams, run
from moed.daemon.engine.loader import load_resident

PROMPT = "The cache holds the experts that"


def generate(env, model, *extra) -> dict:
    out = moed(env, "generate", "--model", str(model), "--prompt", PROMPT, "--max-tokens", "24",
               "--cache-fraction", "0.5", "--json", *extra, timeout=240)
    return json.loads(out.stdout.strip().splitlines()[-1])


def reference_tokens(model) -> list[int]:
    net, tok = load_resident(model)
    return run(net, tok, PROMPT, SamplingParams(max_tokens=24)).tokens


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe"])
def test_two_ranks_generate_the_tokens_of_one_host(tiny_model, tmp_path, arch):
    model = tiny_model(arch)
    env = env_for(tmp_path / "rt")
    one = generate(env, model)
    two = generate(env, model, "--ranks", "2")
    assert two["tokens"] == one["tokens"] == reference_tokens(model)
    ranks = two["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    n_layers = len(one["slots_per_layer"])
    assert ranks[1]["layers"][0] == 0 and ranks[1]["layers"][1] == ranks[0]["layers"][0]
    assert ranks[0]["layers"][1] == n_layers  # rank 0 holds the last layers, together all of them
    assert all(r["hits"] + r["misses"] > 0 for r in ranks)  # each rank paged its own experts
    assert all(r["non_expert_bytes"] < one["non_expert_bytes"] for r in ranks)  # and kept only its layers
    # sampling: every rank draws the same token from the same logits
    sampled = ("--temp", "1.0", "--seed", "7")
    assert generate(env, model, *sampled, "--ranks", "2")["tokens"] == generate(env, model, *sampled)["tokens"]


def test_architecture_without_pipeline_split_is_refused(tiny_model, tmp_path):
    env = env_for(tmp_path / "rt")
    p = moed(env, "generate", "--model", str(tiny_model("mixtral")), "--prompt", "hi", "--ranks", "2",
             check=False, timeout=120)
    assert p.returncode != 0 and "no pipeline split" in p.stdout + p.stderr


def test_two_rank_daemon_serves_and_stops_clean(tiny_model, tmp_path):
    model = tiny_model("qwen3_moe")
    runtime = tmp_path / "rt"
    env = env_for(runtime)
    want = reference_tokens(model)
    moed(env, "start", "--model", str(model), "--cache-fraction", "0.5", "--ranks", "2", "--lookahead", timeout=240)
    try:
        from moed.client.client import Client

        with Client(str(runtime)) as c:
            got = [ev.token for ev in c.generate(prompt=PROMPT, max_tokens=24) if hasattr(ev, "token")]
        assert got == want
        snap = status(env)
        ranks = snap["ranks"]
        assert len(ranks) == 2 and ranks[0]["pid"] == snap["pid"]
        assert sorted(tuple(r["layers"]) for r in ranks) == [(0, 2), (2, 4)]
        ps = moed(env, "ps").stdout
        assert "ranks" in ps and "stacked, buffered, lookahead" in ps  # no pack here; lookahead: a partial cache
        assert snap["io"]["packed"] is False and snap["io"]["lookahead"] is True
        workers = [w["pid"] for w in snap["workers"]]
    finally:
        moed(env, "stop")
    pids = [r["pid"] for r in ranks]
    assert_nothing_left(runtime, pids + workers, snap["pid"])
    assert not shm_of(ranks[1]["pid"])


def test_hosts_file_runs_one_rank_per_entry(tiny_model, tmp_path):
    """--hosts takes an mlx.launch host file; two loopback entries are two ranks here."""
    model = tiny_model("qwen3_moe")
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    env = env_for(tmp_path / "rt")
    got = generate(env, model, "--hosts", str(hosts))
    assert len(got["ranks"]) == 2 and got["tokens"] == reference_tokens(model)
    missing = moed(env, "generate", "--model", str(model), "--prompt", "hi", "--hosts", str(tmp_path / "nope.json"),
                   check=False)
    assert missing.returncode == 2 and "no host file" in missing.stderr
