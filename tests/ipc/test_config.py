"""One paging configuration (moed.ipc.config.PagingConfig): parsed, validated, passed on unchanged
to the daemon, the loader, the bench's subprocesses and every rank."""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import fields, replace

import psutil
import pytest
from daemon_util import assert_nothing_left, env_for, moed, status

from moed.client import launch
from moed.client.cli import _daemon_args, build_parser
from moed.ipc.config import PagingConfig

CONFIGS = [
    PagingConfig(),
    PagingConfig(cache_fraction=0.25),
    PagingConfig(cache_fraction=1.0, workers=1, lookahead=True),
    PagingConfig(cache_gb=0.125, dtype="float32", top_k=2, warm=False, lookahead=False, direct=True, packed=False),
    PagingConfig(cache_fraction=1 / 3, workers=7, top_k=1, direct=True),
]
REQUIRED = {"generate": ["--model", "m", "--prompt", "p"], "start": [], "daemon": [], "plan": ["--model", "m"],
            "bench": ["--model", "m", "--out", "o.json"], "trace": ["--model", "m", "--out", "o.json"]}
SUBSETS = {"plan": PagingConfig.sizing(), "bench": ("workers", "dtype"), "trace": ("workers",)}


def parse(verb: str, argv: list[str]):
    return build_parser().parse_args([verb, *REQUIRED[verb], *argv])


@pytest.mark.parametrize("verb", list(REQUIRED))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: " ".join(c.to_argv()) or "defaults")
def test_flags_round_trip(verb, cfg):
    """from_args(parse(to_argv(c))) == c, on every verb that takes the flags (its subset of them)."""
    names = SUBSETS.get(verb)
    if names is not None:  # keep the fields this verb takes
        cfg = PagingConfig(**{n: getattr(cfg, n) for n in names})
    assert PagingConfig.from_args(parse(verb, cfg.to_argv())) == cfg
    assert PagingConfig.from_dict(json.loads(json.dumps(cfg.as_dict()))) == cfg  # the bench's specs


def test_defaults_are_the_flags_defaults_and_each_field_has_its_flag():
    assert PagingConfig.from_args(parse("generate", [])) == PagingConfig()
    assert PagingConfig().to_argv() == []
    for verb in ("generate", "start", "daemon"):
        assert {f.name for f in fields(PagingConfig)} <= set(vars(parse(verb, [])))


def test_plan_takes_only_what_sizes_the_cache():
    """`moed plan` refuses the flags it would ignore (argparse: unrecognized arguments)."""
    assert set(PagingConfig.sizing()) == {"cache_fraction", "cache_gb", "workers", "dtype", "top_k"}
    for flag in ("--no-warm", "--lookahead", "--no-lookahead", "--direct", "--no-pack"):
        with pytest.raises(SystemExit):
            parse("plan", [flag])


def test_the_options_are_declared_once():
    """Nothing downstream spells the options out again: it takes the config."""
    from moed.daemon.engine.loader import load_paged
    from moed.daemon.service.supervisor import DaemonConfig
    from moed.daemon.tools.plan import make_plan

    names = {f.name for f in fields(PagingConfig)}
    assert not names & {f.name for f in fields(DaemonConfig)}
    for fn in (load_paged, make_plan):
        assert not names & set(inspect.signature(fn).parameters), fn.__name__


@pytest.mark.parametrize("options, flag", [
    ({"cache_fraction": 0}, "--cache-fraction"), ({"cache_fraction": 1.5}, "--cache-fraction"),
    ({"cache_fraction": float("nan")}, "--cache-fraction"), ({"cache_fraction": "half"}, "--cache-fraction"),
    ({"cache_gb": 0}, "--cache-gb"), ({"cache_gb": -1.0}, "--cache-gb"), ({"cache_gb": float("inf")}, "--cache-gb"),
    ({"cache_fraction": 0.5, "cache_gb": 1.0}, "--cache-fraction or --cache-gb"),
    ({"workers": 0}, "--workers"), ({"workers": 1.5}, "--workers"), ({"workers": True}, "--workers"),
    ({"top_k": 0}, "--top-k"), ({"dtype": "int4"}, "--dtype"), ({"lookahead": "yes"}, "--lookahead"),
    ({"warm": None}, "--no-warm"), ({"direct": 1}, "--direct"), ({"packed": "no"}, "--no-pack"),
])
def test_bad_values_are_refused_by_their_flag(options, flag):
    with pytest.raises(ValueError, match=re.escape(flag)):
        PagingConfig(**options)
    with pytest.raises(ValueError, match=re.escape(flag)):  # and when changed later
        replace(PagingConfig(), **options)


def test_unknown_options_are_refused_by_name():
    with pytest.raises(ValueError, match="cache_fracton"):
        PagingConfig.from_dict({"cache_fracton": 0.5})
    with pytest.raises(TypeError, match="cache_fracton"):
        replace(PagingConfig(), cache_fracton=0.5)


@pytest.mark.parametrize("argv, flag", [
    (["generate", "--prompt", "hi", "--top-k", "0"], "--top-k"),  # was ignored: 0 read as "the model's"
    (["generate", "--prompt", "hi", "--cache-gb", "inf"], "--cache-gb"),  # was an OverflowError traceback
    (["start", "--cache-fraction", "0"], "--cache-fraction"),  # was refused by the daemon, after it started
    (["generate", "--prompt", "hi", "--workers", "0", "--ranks", "2"], "--workers"),  # before any rank starts
])
def test_cli_refuses_bad_values_at_once(tiny_model, tmp_path, argv, flag):
    runtime = tmp_path / "rt"
    p = moed(env_for(runtime), argv[0], "--model", str(tiny_model("qwen3_moe")), *argv[1:], check=False)
    assert p.returncode == 2 and f"moed: error: {flag}" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (runtime / "daemon.log").exists()  # nothing was started


def test_start_passes_the_config_to_the_daemon_and_its_ranks():
    a = parse("start", ["--model", "m", "--cache-gb", "0.5", "--workers", "3", "--no-warm", "--no-lookahead",
                        "--direct", "--max-batch", "4"])
    cfg = PagingConfig.from_args(a)
    daemon_argv = _daemon_args(a)
    d = parse("daemon", daemon_argv)
    assert PagingConfig.from_args(d) == cfg and d.max_batch == 4
    ranks = launch.launch_argv(["daemon", *daemon_argv], ranks=2)  # `moed start --ranks 2`
    i = ranks.index("daemon")
    assert PagingConfig.from_args(parse("daemon", ranks[i + 1:])) == cfg


def test_daemon_reports_the_paging_options_it_was_started_with(tiny_model, tmp_path):
    runtime = tmp_path / "rt"
    env = env_for(runtime)
    cfg = PagingConfig(cache_gb=1e-9, workers=1, top_k=2, warm=False, lookahead=False)  # 1e-9: clamps to top-k
    moed(env, "start", "--model", str(tiny_model("qwen3_moe")), *cfg.to_argv())
    try:  # the daemon is stopped whatever fails below, status included
        snap = status(env)
        cmdline = psutil.Process(snap["pid"]).cmdline()
        assert cmdline[cmdline.index("daemon") + 1:][2:2 + len(cfg.to_argv())] == cfg.to_argv()
        assert len(snap["workers"]) == 1
        assert snap["checkpoint"]["top_k"] == 2 and set(snap["cache"]["slots_per_layer"]) == {2}
        assert sum(snap["cache"]["used_slots"]) == 0  # --no-warm: nothing read at load
        assert snap["io"]["lookahead"] is False
    finally:
        moed(env, "stop")
    assert_nothing_left(runtime, [snap["pid"]] + [w["pid"] for w in snap["workers"]], snap["pid"])


def test_every_rank_runs_with_the_options(tiny_model, tmp_path):
    """`moed generate --ranks 2 ...`: each rank parses the same options (here: one I/O worker each)."""
    out = moed(env_for(tmp_path / "rt"), "generate", "--model", str(tiny_model("qwen3_moe")), "--prompt", "Hello",
               "--max-tokens", "4", "--json", "--workers", "1", "--cache-fraction", "0.5", "--no-warm",
               "--ranks", "2", timeout=240)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert [x["rank"] for x in r["ranks"]] == [0, 1]
    assert all(x["workers"] == 1 for x in r["ranks"]) and r["workers"] == 1
