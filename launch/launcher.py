"""`diet launch`: start a `diet` command (normally `train`) on every rank of one or several nodes.

    diet launch --nproc_per_node 8 train --config in1k.yaml                      # one node, 8 GPUs
    diet launch --hostfile hosts --nproc_per_node 8 train ...                    # nodes over ssh (pdsh)
    diet launch --nnodes 4 --node_rank $R --master_addr node0 train ...          # one call per node, no ssh
    diet launch --nproc_per_node 2 train --train.device=cpu ...                  # CPU: 2 gloo ranks
    diet launch --dry-run ...                                                    # print the command only

It builds and runs a DeepSpeed launcher command (or torchrun's, `--runner torchrun`):

* one node: `deepspeed --num_gpus K --master_port P --no_local_rank --module launch.launcher ...`;
* several nodes from a hostfile (DeepSpeed format, `host slots=K` per line): DeepSpeed starts every
  node over ssh with pdsh; the repository and the environment must exist at the same path there;
* no ssh (SLURM, Kubernetes, or by hand): run one `diet launch` per node with its `--node_rank`
  (default: $NODE_RANK or $SLURM_NODEID), `--nnodes` (default: $NNODES or $SLURM_NNODES) and the
  first node's address `--master_addr` (default: $MASTER_ADDR). Without a hostfile a synthetic one
  (`node0 … node{N-1}`, K slots each) gives DeepSpeed the world layout; with `--no_ssh` no host
  name is ever contacted. See launch/slurm/ for a batch script.

Every rank runs `python -m diet_engine.launch.launcher --rank-entry [--env K=V ...] COMMAND ...`, which sets its
environment (e.g. DIET_DEEPSPEED_CONFIG, OMP_NUM_THREADS) before torch is imported and then runs
`diet COMMAND ...`; variables thus reach every node whatever the launcher exports. Rank, world size
and rendezvous come from the launcher's RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT.
On machines without CUDA the ranks use gloo, each with OMP_NUM_THREADS = cores / K (unless set).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PORT = 29500


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "launch", help="run a diet command (e.g. train) on every rank of one or several nodes (DeepSpeed)",
        description="Start `diet COMMAND ...` on k ranks per node over one or several nodes, through DeepSpeed's "
        "launcher (or torchrun). Example: diet launch --nproc_per_node 8 train --config run.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="multi-node without ssh: run on node i:  diet launch --nnodes N --node_rank i "
        "--master_addr FIRST_NODE --nproc_per_node K train ...",
    )
    p.add_argument("--nproc_per_node", "--num_gpus", type=int, default=None,
                   help="ranks per node (default: the CUDA devices visible, or 1 without CUDA)")
    p.add_argument("--nnodes", type=int, default=None,
                   help="number of nodes (default: $NNODES, $SLURM_NNODES, the hostfile's hosts, or 1)")
    p.add_argument("--node_rank", type=int, default=None,
                   help="this node's rank for launches without ssh (default: $NODE_RANK or $SLURM_NODEID)")
    p.add_argument("--master_addr", default=None,
                   help="address of node 0 (default: $MASTER_ADDR, or 127.0.0.1 on one node)")
    p.add_argument("--master_port", type=int, default=None,
                   help=f"rendezvous port (default: $MASTER_PORT, {DEFAULT_PORT} on several nodes, a free port on one)")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile: one `host slots=K` line per node")
    p.add_argument("--runner", choices=("deepspeed", "torchrun"), default="deepspeed",
                   help="process launcher (default: deepspeed)")
    p.add_argument("--deepspeed_config", default=None,
                   help="JSON fragment merged into the engine's DeepSpeed config on every rank "
                   "(see launch/deepspeed_configs/)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable to set on every rank (repeatable)")
    p.add_argument("--log_dir", default=None, help="DeepSpeed: write each rank's output to a file in this folder")
    p.add_argument("--dry-run", action="store_true", help="print the launcher command and exit")
    p.add_argument("rank_command", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help="the diet command to run on every rank, e.g. train --config run.yaml")
    p.set_defaults(func=run)
    return p


# ---------------------------------------------------------------------- resolution
def _env_int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n, "")
        if v.strip():
            try:
                return int(v)
            except ValueError as e:
                raise ValueError(f"environment variable {n}={v!r} is not an integer") from e
    return None


def _cuda_devices() -> int:
    try:
        import torch  # noqa: PLC0415

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """[(host, slots)] from a DeepSpeed hostfile; comments (#) and blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--hostfile {path}: no such file")
    hosts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if len(parts) != 2 or not slots or not slots[0][6:].isdigit():
            raise ValueError(f"{path}:{n}: expected `hostname slots=K`, got {line!r}")
        hosts.append((parts[0], int(slots[0][6:])))
    if not hosts:
        raise ValueError(f"--hostfile {path}: no hosts listed")
    return hosts


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults from the environment and check the combination; errors name the option."""
    cmd = list(args.rank_command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ValueError("diet launch: give the command to run on every rank, "
                         "e.g. `diet launch --nproc_per_node 2 train ...`")
    if cmd[0].startswith("-"):
        raise ValueError(f"diet launch: unknown launch option {cmd[0]!r} (launch options come before the command)")
    hosts = read_hostfile(args.hostfile) if args.hostfile else None
    gpus = _cuda_devices()
    nproc = args.nproc_per_node
    if nproc is None:
        nproc = hosts[0][1] if hosts else max(gpus, 1)
    if nproc < 1:
        raise ValueError(f"--nproc_per_node={nproc}: expected >= 1")
    if gpus and nproc > gpus:
        raise ValueError(f"--nproc_per_node={nproc}: only {gpus} CUDA devices are visible on this node")
    nnodes = args.nnodes if args.nnodes is not None else _env_int("NNODES", "SLURM_NNODES")
    if nnodes is None:
        nnodes = len(hosts) if hosts else 1
    if nnodes < 1:
        raise ValueError(f"--nnodes={nnodes}: expected >= 1")
    if hosts and nnodes > len(hosts):
        raise ValueError(f"--nnodes={nnodes} but --hostfile {args.hostfile} lists {len(hosts)} hosts")
    node_rank = args.node_rank if args.node_rank is not None else (
        _env_int("NODE_RANK", "SLURM_NODEID") if nnodes > 1 else None)
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise ValueError(f"--node_rank={node_rank}: expected 0 <= node_rank < nnodes={nnodes}")
    ssh = nnodes > 1 and node_rank is None
    if ssh and not hosts:
        raise ValueError(f"--nnodes={nnodes}: give --node_rank (one launch per node, no ssh) or a --hostfile "
                         "(DeepSpeed starts the nodes over ssh)")
    if ssh and args.runner == "torchrun":
        raise ValueError("--runner torchrun starts one node per call: give --node_rank on each node")
    master_addr = args.master_addr or os.environ.get("MASTER_ADDR") or None
    if nnodes > 1 and not ssh and not master_addr:
        raise ValueError("--master_addr: required with --nnodes > 1 and --node_rank (the address of node 0)")
    if nnodes == 1 and not master_addr:
        master_addr = "127.0.0.1"
    port = args.master_port if args.master_port is not None else _env_int("MASTER_PORT")
    if port is None:
        port = DEFAULT_PORT if nnodes > 1 else _free_port()
    env = {}
    for item in args.env:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ValueError(f"--env {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        env[k] = v
    if args.deepspeed_config:
        path = Path(args.deepspeed_config).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--deepspeed_config {args.deepspeed_config}: no such file")
        env["DIET_DEEPSPEED_CONFIG"] = str(path)
    if not gpus and "OMP_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))  # CPU ranks share the cores
    return argparse.Namespace(command=cmd, hosts=hosts, nproc=nproc, nnodes=nnodes, node_rank=node_rank,
                              ssh=ssh, master_addr=master_addr, master_port=port, env=env, runner=args.runner,
                              hostfile=args.hostfile, log_dir=args.log_dir)


# ---------------------------------------------------------------------- commands
def rank_command(r: argparse.Namespace) -> list[str]:
    """What every rank runs after the launcher's `python -u -m`: the rank entry of this module."""
    out = ["diet_engine.launch.launcher", "--rank-entry"]
    for k, v in sorted(r.env.items()):
        out += ["--env", f"{k}={v}"]
    return out + ["--", *r.command]


def deepspeed_command(r: argparse.Namespace, hostfile: str | None) -> list[str]:
    exe = shutil.which("deepspeed")
    cmd = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile:
        cmd += ["--hostfile", hostfile, "--num_nodes", str(r.nnodes)]
    cmd += ["--num_gpus", str(r.nproc), "--master_port", str(r.master_port)]
    if r.master_addr:
        cmd += ["--master_addr", r.master_addr]
    if r.node_rank is not None and r.nnodes > 1:
        cmd += ["--no_ssh", "--node_rank", str(r.node_rank)]
    if r.log_dir:
        cmd += ["--enable_each_rank_log", r.log_dir]
    return cmd + ["--no_local_rank", "--module", *rank_command(r)]


def torchrun_command(r: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(r.nnodes), "--nproc_per_node", str(r.nproc),
           "--node_rank", str(r.node_rank or 0), "--master_addr", r.master_addr, "--master_port", str(r.master_port)]
    return cmd + ["-m", *rank_command(r)]


def synthetic_hostfile(nnodes: int, nproc: int, folder: str) -> str:
    """A hostfile `node0 slots=K` … for no-ssh launches: DeepSpeed only needs the world layout."""
    path = Path(folder) / "hostfile"
    path.write_text("".join(f"node{i} slots={nproc}\n" for i in range(nnodes)))
    return str(path)


def run(args: argparse.Namespace) -> int:
    r = resolve(args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory(prefix="diet-launch-") as tmp:
        if r.runner == "torchrun":
            cmd = torchrun_command(r)
        else:
            hostfile = r.hostfile
            if hostfile is None and r.nnodes > 1:
                hostfile = synthetic_hostfile(r.nnodes, r.nproc, tmp)
            cmd = deepspeed_command(r, hostfile)
        if args.dry_run:
            print(shlex.join(cmd))
            return 0
        return _run_forwarding_signals(cmd, env)


_FORWARDED = ("SIGTERM", "SIGUSR1", "SIGUSR2")  # the signals train.preempt_signal may name


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run the per-node launcher in its own session and pass a preemption signal to the rank
    processes only (never to DeepSpeed's launcher, which would end its ranks itself, or die of
    SIGUSR1): the ranks checkpoint and exit with status 75, which the launcher returns as its own.
    Ctrl-C goes to the whole session, as before."""
    import signal  # noqa: PLC0415

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, frame):
        ranks = _rank_processes(proc.pid)
        if not ranks:  # not started yet: nothing to checkpoint, end the session
            os.killpg(proc.pid, signal.SIGTERM)
        for r in ranks:
            r.send_signal(signum)

    old = {name: signal.signal(getattr(signal, name), forward) for name in _FORWARDED}
    try:
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()
        return 130
    finally:
        for name, handler in old.items():
            signal.signal(getattr(signal, name), handler)


_RANK_MODULE = "diet_engine.launch.launcher"


def _rank_processes(pid: int) -> list:
    """The rank processes (`--rank-entry`) below process `pid`."""
    import psutil  # noqa: PLC0415

    out = []
    try:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                cl = child.cmdline()
                # `python -u -m diet_engine.launch.launcher --rank-entry ...`; DeepSpeed's per-node
                # launcher carries the same words as its arguments, after its own `-m`
                if "-m" in cl and cl[cl.index("-m") + 1 : cl.index("-m") + 3] == [_RANK_MODULE, "--rank-entry"]:
                    out.append(child)
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return out


# ---------------------------------------------------------------------- rank entry
def rank_main(argv: list[str]) -> int:
    """`python -m diet_engine.launch.launcher --rank-entry [--env K=V ...] -- COMMAND ...` on every rank."""
    p = argparse.ArgumentParser(prog="python -m diet_engine.launch.launcher --rank-entry")
    p.add_argument("--rank-entry", action="store_true", required=True)
    p.add_argument("--env", action="append", default=[])
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    for item in a.env:
        k, v = item.split("=", 1)
        os.environ[k] = v  # before torch is imported
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    from diet_engine.launch.cli import main  # noqa: PLC0415

    return main(cmd)


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1:]))
