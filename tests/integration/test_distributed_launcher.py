"""`diet launch` command construction (no processes): one node, hostfile over ssh, no-ssh node
ranks from options or scheduler variables, torchrun, the rank entry, and the errors users hit."""

from __future__ import annotations

import argparse
import json

import pytest

from diet_engine.engine.distributed import deepspeed_config, load_extra_config
from diet_engine.launch import launcher
from diet_engine.launch.cli import build_parser

pytestmark = pytest.mark.integration

_SCHED_VARS = ("NNODES", "SLURM_NNODES", "NODE_RANK", "SLURM_NODEID", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for v in _SCHED_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(launcher, "_cuda_devices", lambda: 0)  # this machine: CPU ranks


def _resolve(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(["launch", *argv])
    return launcher.resolve(args)


def _cmd(argv: list[str], tmp_path) -> list[str]:
    r = _resolve(argv)
    if r.runner == "torchrun":
        return launcher.torchrun_command(r)
    hostfile = r.hostfile or (launcher.synthetic_hostfile(r.nnodes, r.nproc, str(tmp_path)) if r.nnodes > 1 else None)
    return launcher.deepspeed_command(r, hostfile)


def _opt(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_one_node_cpu(tmp_path):
    cmd = _cmd(["--nproc_per_node", "2", "train", "--train.batch_size=8"], tmp_path)
    assert _opt(cmd, "--num_gpus") == "2" and "--no_ssh" not in cmd and "--hostfile" not in cmd
    assert _opt(cmd, "--master_addr") == "127.0.0.1"
    tail = cmd[cmd.index("--module") + 1:]
    assert tail[:2] == ["diet_engine.launch.launcher", "--rank-entry"]
    assert tail[tail.index("--") + 1:] == ["train", "--train.batch_size=8"]
    assert "OMP_NUM_THREADS=" in " ".join(tail)  # CPU ranks split the cores


def test_no_ssh_node_rank_from_options_and_scheduler(tmp_path, monkeypatch):
    cmd = _cmd(["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "4", "--master_addr", "10.1.2.3",
                "train"], tmp_path)
    assert "--no_ssh" in cmd and _opt(cmd, "--node_rank") == "1" and _opt(cmd, "--master_addr") == "10.1.2.3"
    assert _opt(cmd, "--master_port") == str(launcher.DEFAULT_PORT)
    hosts = launcher.read_hostfile(_opt(cmd, "--hostfile"))
    assert hosts == [("node0", 4), ("node1", 4)]
    # SLURM: one `diet launch` per node inside srun; node rank and count from its variables
    monkeypatch.setenv("SLURM_NNODES", "3")
    monkeypatch.setenv("SLURM_NODEID", "2")
    monkeypatch.setenv("MASTER_ADDR", "gpu-a01")
    r = _resolve(["--nproc_per_node", "8", "train"])
    assert (r.nnodes, r.node_rank, r.master_addr) == (3, 2, "gpu-a01")


def test_hostfile_over_ssh_and_torchrun(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nworker-1 slots=8\nworker-2 slots=8\n")
    cmd = _cmd(["--hostfile", str(hostfile), "train"], tmp_path)
    assert _opt(cmd, "--hostfile") == str(hostfile) and _opt(cmd, "--num_nodes") == "2"
    assert _opt(cmd, "--num_gpus") == "8" and "--no_ssh" not in cmd
    cmd = _cmd(["--runner", "torchrun", "--nnodes", "2", "--node_rank", "0", "--master_addr", "h0",
                "--nproc_per_node", "2", "train"], tmp_path)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and _opt(cmd, "--nnodes") == "2"
    assert cmd[cmd.index("-m", 3) + 1] == "diet_engine.launch.launcher"


@pytest.mark.parametrize("argv, message", [
    (["--nproc_per_node", "2"], "give the command"),
    (["--nnodes", "2", "train"], "--node_rank"),
    (["--nnodes", "2", "--node_rank", "2", "--master_addr", "h", "train"], "node_rank=2"),
    (["--nnodes", "2", "--node_rank", "1", "train"], "--master_addr"),
    (["--nproc_per_node", "0", "train"], "nproc_per_node=0"),
    (["--hostfile", "/nonexistent/hosts", "train"], "no such file"),
    (["--deepspeed_config", "/nonexistent.json", "train"], "no such file"),
    (["--env", "NOEQUALS", "train"], "KEY=VALUE"),
])
def test_errors_name_the_option(argv, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _resolve(argv)


def test_bad_hostfile_line(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("worker-1 8\n")
    with pytest.raises(ValueError, match="slots=K"):
        launcher.read_hostfile(f)


def test_deepspeed_config_fragment(tmp_path, monkeypatch):
    """launch/deepspeed_configs/*.json merge over the engine's config; run-config keys are refused."""
    from types import SimpleNamespace

    from diet_engine.launch.launcher import REPO_ROOT

    train = SimpleNamespace(batch_size=32, zero_stage=2)
    optim = SimpleNamespace(grad_clip=1.0)
    files = sorted((REPO_ROOT / "launch" / "deepspeed_configs").glob("*.json"))
    assert files
    for f in files:
        cfg = deepspeed_config(train, optim, load_extra_config(f))
        assert cfg["zero_optimization"]["stage"] == 2 and cfg["train_micro_batch_size_per_gpu"] == 32
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ValueError, match="bf16"):
        load_extra_config(bad)
    monkeypatch.setenv("DIET_DEEPSPEED_CONFIG", str(files[0]))
    assert deepspeed_config(train, optim)["zero_optimization"].keys() >= json.loads(files[0].read_text()).get(
        "zero_optimization", {}).keys()
