"""Faults and friction: a disk that fills up under a run, an unwritable NVMe path, a host too
small for the plan's CPU arena (each one line, before or at the failing step, swap files
removed, the last checkpoint intact); NVMe tiers without bandwidths; a planner ImportError
reported as what it is."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest

import offload.arena
from conftest import ROOT, TINY_JOB, merge
from disttrain.checkpoint import latest_checkpoint
from disttrain.metrics import read_metrics
from disttrain.planning import fixed_plan
from disttrain.spec import GB, SpecError, job_from_dict
from disttrain.trainer import Trainer
from offload.nvme_files import DIR_PREFIX
from planner.hardware import CLUSTER_PRESETS
from planner.plan import LayerActivationPlan

MIB = 1 << 20


def _job(tmp_path, nvme_path, **train):
    return job_from_dict(merge(TINY_JOB, {
        "train": {"steps": 2, "checkpoint_every": 1, **train},
        "cluster": {"nvme": {"path": str(nvme_path), "capacity_gib": 1}},
        "output_dir": str(tmp_path / "run")}))


def _swap_plan(job, tier: str):
    plan = fixed_plan(job, 1)
    layer = LayerActivationPlan(swap_fraction=1.0, tier=tier, swap_input=True)
    return dataclasses.replace(plan, activations=(layer,) * job.shape.num_layers)


def test_nvme_tier_without_bandwidths_takes_the_preset_or_stated_defaults(tmp_path):
    job = _job(tmp_path, tmp_path / "nvme")  # cpu-local preset, no read/write_gbps given
    preset = CLUSTER_PRESETS["cpu-local"]
    assert (job.hardware.nvme_read_bw, job.hardware.nvme_write_bw) == \
        (preset.nvme_read_bw, preset.nvme_write_bw)
    custom = merge(TINY_JOB, {"cluster": {
        "preset": "1xrtx4090-24g", "nvme": {"path": str(tmp_path), "capacity_gib": 1}}})
    hw = job_from_dict(custom).hardware  # a preset without an NVMe tier: the stated defaults
    assert (hw.nvme_read_bw, hw.nvme_write_bw) == (2.0 * GB, 1.0 * GB)


def test_host_too_small_for_the_cpu_arena_is_refused_before_step_1(tmp_path, monkeypatch):
    job = _job(tmp_path, tmp_path / "nvme")
    monkeypatch.setattr(offload.arena, "available_host_bytes", lambda: 8 * MIB)
    with pytest.raises(SpecError, match=r"^cpu store: the plan's host arena needs \d+ bytes "
                                        r".*8388608 bytes available"):
        Trainer(job, _swap_plan(job, "cpu"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unwritable_nvme_path_names_the_path_and_the_bytes(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    job = _job(tmp_path, blocker / "nvme")
    with pytest.raises(SpecError, match=rf"^nvme store: cannot write to {blocker / 'nvme'} "
                                        rf"\(.*\); the plan swaps up to \d+ bytes there$"):
        Trainer(job, _swap_plan(job, "nvme"))


def _mount_tmpfs(target, size: str) -> bool:
    if shutil.which("mount") is None:
        return False
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                          capture_output=True, text=True)
    return done.returncode == 0


def _fill(directory) -> None:
    """Write a file until the filesystem is full."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert "No space left" in str(exc)
    finally:
        os.close(fd)


def test_disk_full_during_a_run_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """A real full disk: an 80 MiB tmpfs passes the pre-flight, then someone else fills it."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "80m"):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    stores = []
    try:
        job = _job(tmp_path, mnt)
        plan = _swap_plan(job, "nvme")
        first = Trainer(job, plan)
        first.run(max_steps=1)  # step 1 swaps to the tmpfs and is checkpointed
        layers = read_metrics(first.metrics_path)[0]["activations"]["layers"]
        assert all(layer["bytes_swapped_nvme"] > 0 for layer in layers)  # the NVMe tier is used
        checkpoint = latest_checkpoint(first.ckpt_dir)
        assert checkpoint is not None and checkpoint.name.endswith("1")
        resumed = Trainer(job, plan)  # its store passes the pre-flight on the empty tmpfs
        stores.append(resumed.runtime.activations.stores["nvme"])
        assert resumed.runtime.activations.stores["nvme"].file.parent.parent == mnt
        _fill(mnt)
        with pytest.raises(SpecError) as info:
            resumed.run(resume=True)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith("activation swap failed: ") and "No space left" in message
        assert f"the plan swaps up to {resumed.runtime.activations.stores['nvme'].config.budget_bytes}" \
               f" bytes to {mnt}" in message
        assert f"last checkpoint: {checkpoint}" in message
        assert not list(mnt.glob(f"{DIR_PREFIX}*")), "swap files must be removed"
        assert latest_checkpoint(first.ckpt_dir) == checkpoint
        assert (checkpoint / "meta.json").is_file()
    finally:
        for store in stores:
            store.close()  # idempotent; only a failed assertion above leaves one open
        subprocess.run(["umount", str(mnt)], check=False)


def test_planner_import_error_is_reported_as_what_it_is(tmp_path, write_spec):
    """A broken planner module: the ImportError itself, not 'planner is not built yet'."""
    shadow = tmp_path / "shadow" / "planner"
    shutil.copytree(ROOT / "planner", shadow, ignore=shutil.ignore_patterns("__pycache__"))
    (shadow / "search.py").write_text("import no_such_module_xyz\n")
    done = subprocess.run([sys.executable, "-m", "disttrain.cli", "plan", str(write_spec())],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{shadow.parent}{os.pathsep}{ROOT}"})
    assert done.returncode != 0
    assert "ModuleNotFoundError: No module named 'no_such_module_xyz'" in done.stderr
    assert "not built yet" not in done.stderr
