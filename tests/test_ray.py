"""The Ray launcher (Ray Train) end to end, on loopback only.

Every Ray here binds 127.0.0.1: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is set before Ray is
imported or started, `RAY_TMPDIR` and `HOME` (Ray writes `$HOME/.ray/auth_token`) point into a
temp dir, and whatever a test starts is shut down in `finally` (never `ray stop`). The 2-rank
reference is the same job on spawned gloo ranks (one thread each, as torchrun and Ray workers
run), so the Ray losses must match it bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY_JOB, CliProcess, merge
from disttrain.metrics import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None
                       or importlib.util.find_spec("pyarrow") is None,
                       reason="Ray Train is not installed (pip install -c constraints.txt "
                              "'.[ray]')"),
]

WORKERS_FILE = "ray_workers.jsonl"
CHANGES = {"train": {"steps": 8, "micro_batch_size": 1, "global_batch_size": 4,
                     "checkpoint_every": 2, "log_every": 1},
           "cluster": {"devices_per_node": 2},
           "parallel": {"dp": 2, "sp": 1, "pp": 1, "zero_stage": 2},
           "launch": {"launcher": "ray"}}


def _spec_dict(output_dir: Path) -> dict:
    return merge(TINY_JOB, {**CHANGES, "output_dir": str(output_dir)})


def _rank_losses(rank, world, spec):
    from disttrain.spec import job_from_dict
    from disttrain.trainer import Trainer

    return Trainer(job_from_dict(spec)).run().losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    """Losses of the uninterrupted 2-rank run on spawned gloo ranks (the torchrun setting)."""
    from disttrain.parallel.spawn import spawn_ranks

    spec = _spec_dict(tmp_path_factory.mktemp("ref") / "run")
    losses = spawn_ranks(_rank_losses, 2, spec)
    assert losses[0] == losses[1]
    return losses[0]


@pytest.fixture
def ray_env(monkeypatch):
    """Loopback-only Ray settings for this test and its subprocesses; a short temp dir (Ray's
    socket paths must stay under 108 bytes), removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="dtray", dir="/tmp"))
    (tmp / "home").mkdir()
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp))  # Ray's temp dir: RAY_TMPDIR/ray
    monkeypatch.setenv("HOME", str(tmp / "home"))
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_spec(tmp_path: Path, name: str) -> tuple[Path, Path]:
    import yaml

    out = tmp_path / name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_spec_dict(out)))
    return path, out


def _train_cmd(spec: Path, *extra: str) -> list[str]:
    """`disttrain train` arguments; the launcher runs as its own process (`CliProcess`: a fork
    of the test fork server, which has torch imported but not Ray)."""
    return ["train", str(spec), "--launcher", "ray", "--no-planner", *extra]


def _run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        proc = CliProcess(argv, out, err)
        try:
            proc.wait(timeout)
        finally:
            _stop(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(),
                                           err.read_text())


def _stop(proc: CliProcess) -> None:
    """Interrupt a launcher still running: its `finally` shuts its embedded Ray down."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def _workers(out: Path) -> list[dict]:
    path = out / WORKERS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _committed(out: Path) -> str | None:
    """The checkpoint Ray Train has committed, from its checkpoint manager's snapshot in the
    run's storage (a checkpoint whose report returned may still be uncommitted)."""
    for path in (out / "ray").glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(path.read_text()).get("latest_checkpoint_result")
        except ValueError:  # being rewritten: look again at the next poll
            return None
        return latest["checkpoint_dir_name"] if latest else None
    return None


def test_two_node_loopback_cluster_trains_like_torchrun_ranks(tmp_path, ray_env, reference):
    """Two workers on a two-node loopback cluster (`--address`): one per node, the torchrun
    ranks' losses bit for bit, one committed checkpoint with every rank's files, a second
    launch refused before Ray is touched, and `disttrain profile` as a Ray task on the same
    cluster. (The launcher's own embedded Ray is the killed-worker test's.)"""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    assert not ray_constants.ENABLE_RAY_CLUSTER, "ray was imported before the loopback setting"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "temp_dir": str(ray_env / "ray")})
    try:
        second = cluster.add_node(num_cpus=1, resources={"node2": 1})
        node_ids = {cluster.head_node.node_id, second.node_id}
        assert len(node_ids) == 2
        assert cluster.address.startswith("127.0.0.1:")
        spec, out = _write_spec(tmp_path, "two_node")
        done = _run(_train_cmd(spec, "--address", cluster.address))
        assert done.returncode == 0, done.stderr[-4000:]
        assert "last loss" in done.stdout
        workers = _workers(out)
        assert sorted(w["rank"] for w in workers) == [0, 1]
        assert {w["node_id"] for w in workers} == node_ids
        assert _losses(out) == reference
        assert [r["step"] for r in read_metrics(out / "metrics.rank1.jsonl")] == list(range(1, 9))
        committed = sorted((out / "ray").glob("*/step_0000008"))
        assert len(committed) == 1
        assert sorted(p.name for p in committed[0].iterdir()) == [  # every rank's DCP files
            ".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"]
        assert not any(p.is_file() for p in (out / ".ray_stage").rglob("*"))  # links removed
        again = _run(_train_cmd(spec, "--address", cluster.address))  # refused, before Ray
        assert again.returncode == 2 and again.stderr.startswith("error: output_dir:")

        from disttrain.spec import job_from_dict
        from launch.ray import profile_on_ray

        job = job_from_dict(_spec_dict(tmp_path / "profile"))
        profile = profile_on_ray(job, cluster.address)  # one task on a 1-CPU worker
        assert profile.device == "cpu" and profile.measurements
        assert sum(profile.bytes_per_token.values()) > 0
    finally:
        cluster.shutdown()


def test_killed_worker_resumes_from_ray_checkpoint_bit_identically(tmp_path, ray_env,
                                                                   reference):
    spec, out = _write_spec(tmp_path, "killed")
    log = tmp_path / "launcher.err"  # Ray's forwarded worker logs: large, kept for reading
    proc = CliProcess(_train_cmd(spec), os.devnull, log)
    try:
        deadline = time.monotonic() + 240
        victim = killed_after = None
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            rank1 = [w for w in _workers(out) if w["rank"] == 1]
            killed_after = _committed(out)
            if rank1 and killed_after:
                victim = rank1[0]["pid"]
            else:
                time.sleep(0.05)
        assert victim is not None, "Ray Train committed no checkpoint before the run ended"
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        _stop(proc)
    stderr = log.read_text()
    assert proc.returncode == 0, stderr[-4000:]
    assert killed_after < "step_0000008", "the worker was killed after the last checkpoint"
    assert len(_workers(out)) == 4, "Ray Train did not restart the worker group"
    resumed = [line for line in stderr.splitlines() if "resumed from" in line]
    assert resumed and f"resumed from {out / 'ray'}" in resumed[0], (resumed, log)
    assert _losses(out) == reference
    assert [r["loss"] for r in read_metrics(out / "metrics.rank1.jsonl")] == reference
