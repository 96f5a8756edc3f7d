"""`--ranks N` / `--hosts FILE`: re-run a moed command on every rank under `mlx.launch`.

Light on purpose (no MLX import): the CLI builds the command line here; inside each rank
daemon/dist/ranks.py takes over. Every rank runs the command as typed (less --ranks/--hosts), so each
parses the same options: the same PagingConfig (moed.ipc.config), checked once before the launch.
`moed start --ranks` launches `moed daemon` with the arguments `start` built (PagingConfig.to_argv).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

RANK_FAILED = re.compile(r"Node with rank \d+ (exited with code|was killed)")


def add_rank_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ranks", type=int, help="split the model's layers across N local processes (MLX ring)")
    g.add_argument("--hosts", metavar="HOSTS.json",
                   help="split the model across the hosts of an mlx.launch host file (the first is this one)")


def wants_launch(a: argparse.Namespace) -> bool:
    """True in the process the user started with --ranks/--hosts (not yet inside a rank)."""
    return (a.ranks is not None or a.hosts is not None) and os.environ.get("MLX_RANK") is None


def strip_rank_args(argv: list[str]) -> list[str]:
    """`argv` without --ranks/--hosts (each rank runs the command without them)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--ranks", "--hosts"):
            skip = True
        elif not arg.startswith(("--ranks=", "--hosts=")):
            out.append(arg)
    return out


def launch_argv(argv: list[str], ranks: int | None = None, hosts: str | None = None) -> list[str]:
    """`mlx.launch ... -- python -m moed.client.cli <argv>`: N local ranks, or the host file's."""
    if (ranks is None) == (hosts is None):
        raise ValueError("give exactly one of --ranks N and --hosts FILE")
    if ranks is not None and ranks < 1:
        raise ValueError(f"--ranks must be at least 1, got {ranks}")
    if hosts is not None and not os.path.isfile(hosts):
        raise FileNotFoundError(f"--hosts: no host file {hosts}")
    launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or "mlx.launch"
    # a host file may name its backend (e.g. jaccl over Thunderbolt); N local ranks use the ring
    where = ["--hostfile", str(hosts)] if hosts else ["--backend", "ring", "-n", str(ranks)]
    return [launcher, *where, "--", sys.executable, "-m", "moed.client.cli", *argv]


def spawn(argv: list[str], ranks: int | None = None, hosts: str | None = None, **popen) -> subprocess.Popen:
    """Start `moed <argv>` on every rank under mlx.launch.

    Its stdin is a pipe that nobody writes and that never closes (the launcher inherits the write
    end): mlx.launch forwards its stdin to the ranks and would spin on an always-readable /dev/null.
    """
    r, w = os.pipe()
    try:
        return subprocess.Popen(launch_argv(argv, ranks, hosts), stdin=r, pass_fds=(w,), **popen)
    finally:
        os.close(r)
        os.close(w)


def run(argv: list[str], ranks: int | None = None, hosts: str | None = None) -> int:
    """Run `moed <argv>` on every rank in the foreground; nonzero if any rank failed.

    mlx.launch itself exits 0 whatever its ranks did, so its warnings on stderr are watched.
    """
    proc = spawn(argv, ranks, hosts, stderr=subprocess.PIPE, text=True, errors="replace")
    failed = False
    for line in proc.stderr:
        sys.stderr.write(line)
        failed |= bool(RANK_FAILED.search(line))
    return proc.wait() or int(failed)
