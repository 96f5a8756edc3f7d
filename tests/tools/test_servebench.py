"""`moed bench --workload chat|agent|contention` end to end on a tiny model: both servers (moed's daemon and
mlx_lm.server) run, answer over HTTP, and the provenance file carries the figures. No timing assertions."""

import json

import pytest

from moed.daemon.tools import servebench


def provenance(path) -> dict:
    doc = json.loads(path.read_text())
    assert doc["kind"] == "moed-serve-bench"
    for key in ("config", "machine", "versions", "git_commit", "results", "summary", "command"):
        assert key in doc, key
    assert set(doc["results"]) == {"moed", "mlx-lm"}
    return doc


def test_chat_workload(tiny_model, tmp_path):
    out = tmp_path / "chat.json"
    servebench.run("chat", str(tiny_model("qwen3_moe")), str(out), max_tokens=4, turns=3, log=lambda m: None)
    doc = provenance(out)
    for kind in ("moed", "mlx-lm"):
        (rnd,) = doc["results"][kind]
        assert [t["turn"] for t in rnd["turns"]] == [1, 2, 3]
        assert all(t["ttft_s"] > 0 and t["chunks"] >= 1 for t in rnd["turns"])
        # each turn resends the history: the prompt grows
        assert rnd["turns"][2]["prompt_tokens"] > rnd["turns"][0]["prompt_tokens"]
        assert len(doc["summary"][kind]["ttft_per_turn_s"]) == 3
    # moed's prompt cache reuses the history of the turn before (its usage says how much)
    assert doc["results"]["moed"][0]["turns"][2]["cached_tokens"] > 0


@pytest.mark.slow
def test_agent_and_contention_workloads(tiny_model, tmp_path):
    model = str(tiny_model("qwen3_moe"))
    out = tmp_path / "agent.json"
    servebench.run("agent", model, str(out), max_tokens=4, calls=2, system_tokens=400, log=lambda m: None)
    doc = provenance(out)
    moed = doc["results"]["moed"][0]
    assert [c["call"] for c in moed["calls"]] == ["first", "first, repeated", "call 2"]
    assert moed["calls"][0]["prompt_tokens"] >= 400
    assert moed["cached_after_restart"] > 0  # the system prompt came back from --prompt-cache-dir
    assert doc["summary"]["mlx-lm"]["ttft_after_restart_s"] > 0

    out = tmp_path / "contention.json"
    servebench.run("contention", model, str(out), prefill_chunks=(64,), prompt_tokens=600, a_tokens=2000,
                   log=lambda m: None)
    doc = provenance(out)
    assert [r["prefill_chunk"] for r in doc["results"]["moed"]] == [64]
    for kind in ("moed", "mlx-lm"):
        (row,) = doc["results"][kind][0]["rounds"]
        assert row["b_prompt_tokens"] >= 600 and row["a_alone"]["n"] > 0 and row["a_tokens"] > 6
        assert row["a_itl_window"]["n"] >= 1
