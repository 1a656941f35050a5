"""Activation stores: budget errors, reuse across steps, NVMe pre-flight, cleanup, and I/O
faults that must raise with the file path instead of returning stale data."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from disttrain.model import build_model
from offload.engine import CopyEngineConfig, create_engine
from offload.policy import apply_activation_policy
from offload.arena import Arena
from offload.nvme_files import DIR_PREFIX, sweep_stale
from offload.stores import (CpuStore, CpuStoreConfig, NvmeStore, NvmeStoreConfig, StoreBudgetError,
                            StoreIOError, open_stores)
from planner.plan import LayerActivationPlan as Layer
from planner.shapes import MODEL_PRESETS

ROOT = Path(__file__).resolve().parents[1]
TINY = MODEL_PRESETS["tiny"]
MIB = 1 << 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["cpp", "python"])
def engine(request):
    eng = create_engine(CopyEngineConfig(backend=request.param))
    yield eng
    eng.shutdown()


def tokens(seq: int = 32) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (2, seq), generator=torch.Generator().manual_seed(3))


def nvme_store(engine, root: Path, budget: int = 16 * MIB, run_id: str = "t") -> NvmeStore:
    return NvmeStore(NvmeStoreConfig(path=str(root), budget_bytes=budget, run_id=run_id), engine)


def test_cpu_budget_exceeded_is_a_clear_error(engine):
    model = build_model(TINY, seed=0)
    store = CpuStore(CpuStoreConfig(budget_bytes=64 * 1024), engine)
    with apply_activation_policy(model, [Layer(swap_fraction=1.0)] * 2, stores={"cpu": store}):
        with pytest.raises(StoreBudgetError, match="cpu store: budget exceeded"):
            model(tokens()).sum().backward()


def test_cpu_store_reuses_its_buffer_across_steps(engine):
    model = build_model(TINY, seed=0)
    store = CpuStore(CpuStoreConfig(budget_bytes=8 * MIB), engine)
    with apply_activation_policy(model, [Layer(swap_fraction=0.5, swap_input=True)] * 2,
                                 stores={"cpu": store}) as runtime:
        peaks = []
        for _ in range(3):
            model(tokens()).sum().backward()
            assert store.bytes_in_use == 0
            peaks.append(store.arena.peak)
            swapped = sum(layer["bytes_swapped_cpu"] for layer in runtime.step_metrics()["layers"])
    assert peaks[0] == peaks[-1] >= swapped > 0  # no growth: the same arena ranges every step
    assert not store._memory.is_pinned()  # pinning needs CUDA


def test_nvme_preflight_refuses_with_path_and_bytes(engine, tmp_path):
    need = shutil.disk_usage(tmp_path).free + (1 << 40)
    with pytest.raises(StoreBudgetError, match=rf"{tmp_path}.*needs {need} bytes"):
        nvme_store(engine, tmp_path, budget=need)
    assert not list(tmp_path.glob(f"{DIR_PREFIX}*"))


def test_nvme_files_removed_at_close_and_by_context_manager(engine, tmp_path):
    store = nvme_store(engine, tmp_path, run_id="a")
    assert store.file.exists() and store.directory.parent == tmp_path
    stored = store.put(torch.arange(1000.0))
    assert torch.equal(store.get(stored), torch.arange(1000.0))
    store.release(stored)
    store.close()
    assert not store.directory.exists()
    with nvme_store(engine, tmp_path, run_id="b") as other:
        directory = other.directory
    assert not directory.exists()


CHILD = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    from offload.engine import CopyEngineConfig, create_engine
    from offload.stores import NvmeStore, NvmeStoreConfig
    store = NvmeStore(NvmeStoreConfig(path={path!r}, budget_bytes=1 << 20, run_id={mode!r}),
                      create_engine(CopyEngineConfig(backend="python")))
    print(store.directory, flush=True)
    if {mode!r} == "interrupt":
        raise KeyboardInterrupt
    if {mode!r} == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_nvme_files_removed_after_ctrl_c_sigterm_and_crash(tmp_path):
    dirs = {}
    for mode in ("interrupt", "sigterm", "crash"):
        code = CHILD.format(root=str(ROOT), path=str(tmp_path), mode=mode)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        dirs[mode] = Path(proc.stdout.strip())
        assert dirs[mode].parent == tmp_path, proc.stderr
    assert not dirs["interrupt"].exists(), "atexit must remove files after Ctrl-C"
    assert not dirs["sigterm"].exists(), "the SIGTERM handler must remove files"
    assert dirs["crash"].exists()  # SIGKILL: nothing runs; the next run sweeps it
    assert sweep_stale(tmp_path) == [dirs["crash"]]
    assert not dirs["crash"].exists()


def _forward_then_truncate_then_backward(engine, root):
    model = build_model(TINY, seed=0)
    store = nvme_store(engine, root)
    with apply_activation_policy(model, [Layer(swap_fraction=1.0, tier="nvme", swap_input=True)] * 2,
                                 stores={"nvme": store}) as runtime:
        loss = model(tokens()).sum()
        runtime.wait_copies()  # the swapped data is on disk; then the file shrinks under the run
        os.truncate(store.file, 0)
        with pytest.raises(StoreIOError, match=str(store.file)):
            loss.backward()


def test_nvme_truncated_file_raises_instead_of_stale_data(engine, tmp_path):
    _forward_then_truncate_then_backward(engine, tmp_path)
    assert not list(tmp_path.glob(f"{DIR_PREFIX}*"))


def test_nvme_write_error_raises_with_path(engine, tmp_path):
    """A file-size limit makes pwrite fail (EFBIG) like a full disk would: an injected fault."""
    store = nvme_store(engine, tmp_path)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (MIB, hard))
    try:
        first = store.put(torch.zeros(MIB // 4))  # fills [0, 1 MiB): allowed
        second = store.put(torch.ones(MIB // 4))  # beyond the limit: EFBIG
        store.wait_written(first)
        with pytest.raises(StoreIOError, match=rf"{store.file}.*File too large"):
            store.wait_written(second)
        with pytest.raises(StoreIOError, match=str(store.file)):
            store.get(second)  # never the zeros the sparse file holds there
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    store.close()


def _mount_tmpfs(target: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    target.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                          capture_output=True, text=True)
    return proc.returncode == 0


def test_nvme_full_filesystem_raises_with_path(engine, tmp_path):
    """A real full disk: a 2 MiB tmpfs filled by someone else after the pre-flight passed."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    store = None
    try:
        store = nvme_store(engine, mnt, budget=MIB)
        with pytest.raises(StoreBudgetError, match=str(mnt)):
            nvme_store(engine, mnt, budget=64 * MIB, run_id="big")
        filler = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    os.write(filler, b"\0" * 65536)
        finally:
            os.close(filler)
        stored = store.put(torch.ones(MIB // 8))
        with pytest.raises(StoreIOError, match=rf"{store.file}.*No space left"):
            store.wait_written(stored)
    finally:
        if store is not None:
            store.close()
        subprocess.run(["umount", str(mnt)], check=True)


def test_arena_first_fit_reuses_holes_and_enforces_the_budget():
    arena = Arena(capacity=1024, alignment=64, what="test arena")
    a, _ = arena.allocate(100)
    b, b_size = arena.allocate(200)
    c, _ = arena.allocate(64)
    assert (a, b, c) == (0, 128, 128 + b_size)
    arena.free(b)
    assert arena.allocate(150)[0] == b  # the hole left by b
    with pytest.raises(StoreBudgetError, match="test arena: budget exceeded"):
        arena.allocate(1024)
    assert (arena.peak, arena.in_use) == (128 + b_size + 64, 128 + 192 + 64)


def test_open_stores_and_discarding_a_step_that_never_ran_backward(engine, tmp_path):
    plans = [Layer(swap_fraction=0.5), Layer(swap_fraction=0.5, tier="nvme", swap_input=True)]
    with pytest.raises(ValueError, match="cluster.nvme.path"):
        open_stores(plans, engine=engine, cpu_budget_bytes=MIB)
    stores = open_stores(plans, engine=engine, cpu_budget_bytes=8 * MIB, nvme_path=str(tmp_path),
                         nvme_budget_bytes=8 * MIB, run_id="discard")
    assert sorted(stores) == ["cpu", "nvme"]
    model = build_model(TINY, seed=0)
    with apply_activation_policy(model, plans, stores=stores) as runtime:
        model(tokens())  # e.g. the step is skipped after a non-finite loss
        assert all(store.bytes_in_use > 0 for store in stores.values())
        runtime.discard_pending()
        assert all(store.bytes_in_use == 0 for store in stores.values())
        model(tokens()).sum().backward()  # the next step runs normally
    assert not list(tmp_path.glob(f"{DIR_PREFIX}*"))
