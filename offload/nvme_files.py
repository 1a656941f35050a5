"""Housekeeping of NVMe swap directories: free-space pre-flight, removal at exit, on SIGTERM
and of directories left by crashed runs (SIGKILL, power loss), found by their owner file."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import threading
import weakref
from pathlib import Path

from offload.arena import StoreBudgetError

GIB = float(1 << 30)
OWNER_FILE = "owner.pid"
DIR_PREFIX = "disttrain-swap-"
_OPEN_STORES: weakref.WeakSet = weakref.WeakSet()
"""Stores whose directories must go at exit (each has `close()`)."""


def check_free_space(path: str | Path, bytes_needed: int) -> None:
    """Refuse (StoreBudgetError naming the path and the bytes) when `path` has too little space."""
    path = Path(path)
    probe = path if path.exists() else next(p for p in path.parents if p.exists())
    free = shutil.disk_usage(probe).free
    if free < bytes_needed:
        raise StoreBudgetError(f"nvme store: {path} has {free} bytes free ({free / GIB:.2f} GiB), "
                               f"the plan needs {bytes_needed} bytes ({bytes_needed / GIB:.2f} GiB)")


def sweep_stale(path: str | Path) -> list[Path]:
    """Remove swap directories under `path` whose owning process (on this host) is gone:
    what a crashed or killed run left behind."""
    removed = []
    for entry in Path(path).glob(f"{DIR_PREFIX}*"):
        owner = entry / OWNER_FILE
        if not owner.is_file():
            continue
        host, _, pid = owner.read_text().strip().rpartition(" ")
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_owner(directory: Path) -> None:
    """Mark `directory` as this process's, for `sweep_stale` on a later run."""
    (directory / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}")


def register_for_cleanup(store) -> None:
    """Remove `store`'s files at interpreter exit and on SIGTERM unless it was closed before."""
    _OPEN_STORES.add(store)
    _install_signal_cleanup()


def unregister(store) -> None:
    """The store was closed: nothing left to remove."""
    _OPEN_STORES.discard(store)


def close_all_nvme_stores() -> None:
    """Remove every open store's files (atexit and SIGTERM)."""
    for store in list(_OPEN_STORES):
        store.close()


atexit.register(close_all_nvme_stores)
_SIGNAL_INSTALLED = False


def _install_signal_cleanup() -> None:
    """On SIGTERM, remove swap files and then die as SIGTERM would (main thread, default handler only)."""
    global _SIGNAL_INSTALLED
    if _SIGNAL_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # someone else owns SIGTERM (e.g. torchrun's agent); atexit still cleans up

    def on_sigterm(signum, frame):
        close_all_nvme_stores()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    _SIGNAL_INSTALLED = True
