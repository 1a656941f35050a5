"""Shared fixtures: small job specs written to a temp dir, the CLI run as a subprocess."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Any Ray a test starts (or imports) binds loopback only: Ray reads this when it is imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

TINY_JOB = {
    "name": "t",
    "model": {"preset": "tiny"},
    "train": {"seq_len": 64, "micro_batch_size": 2, "global_batch_size": 4, "steps": 6,
              "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "checkpoint_every": 3,
              "log_every": 1, "seed": 1},
    "data": {"kind": "text"},
    "cluster": {"preset": "cpu-local"},
    "launch": {"launcher": "local"},
}


def pytest_configure(config):
    """Spawned ranks (`spawn_ranks`) fork from a server that imported torch, the runtime and
    transformers once, instead of importing them again per rank and test (about 3 s a call).
    DISTTRAIN_TEST_START_METHOD=spawn gives every rank a fresh interpreter instead."""
    import importlib.util

    from disttrain.parallel.spawn import use_forkserver

    if os.environ.get("DISTTRAIN_TEST_START_METHOD", "forkserver") != "forkserver":
        return
    preload = ["torch", "disttrain.trainer", "disttrain.parallel.spawn", "pytest", "yaml"]
    if importlib.util.find_spec("transformers") is not None:
        preload.append("transformers")
    use_forkserver(preload)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped where torch sees no CUDA device (never faked)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures(
    "one_thread")`): the machine's 2 cores are shared, and spinning threads contend."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(changes) -> path of a tiny job spec with `changes` merged in."""
    counter = iter(range(1000))

    def write(changes: dict | None = None, *, raw: dict | None = None) -> Path:
        spec = raw if raw is not None else merge(TINY_JOB, changes or {})
        if raw is None:
            spec.setdefault("output_dir", str(tmp_path / f"run{next(counter)}"))
        path = tmp_path / f"job{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return write


def _cli_child(argv: list[str], cwd: str, env: dict, out_path: str, err_path: str) -> None:
    """`python -m disttrain.cli *argv` in a process forked from the test fork server: its own
    cwd, environment, stdout/stderr files and exit code, without importing torch again."""
    import runpy
    import traceback

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [str(ROOT / "disttrain" / "cli.py"), *argv]
    code = 0
    try:
        runpy.run_module("disttrain.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # as the interpreter would: traceback on stderr, exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class CliProcess:
    """`disttrain *argv` started in its own process, stdout and stderr going to files: a fork
    of the test fork server when `pytest_configure` set one up (torch, the runtime and
    transformers already imported), else `python -m disttrain.cli`. Popen's `poll`, `wait`,
    `send_signal` and `returncode`, for a test that must watch or interrupt the run."""

    def __init__(self, argv: list[str], out_path: str | Path, err_path: str | Path,
                 cwd: Path | None = None, env: dict | None = None):
        import multiprocessing

        from disttrain.parallel import spawn

        self.args = ["disttrain", *argv]
        env = dict(os.environ, PYTHONPATH=str(ROOT)) if env is None else env
        if spawn._START_METHOD != "forkserver":
            with open(out_path, "w") as out, open(err_path, "w") as err:
                self._popen = subprocess.Popen([sys.executable, "-m", "disttrain.cli", *argv],
                                               cwd=cwd or ROOT, env=env, stdout=out, stderr=err)
            self.pid = self._popen.pid
            return
        self._popen = None
        self._proc = multiprocessing.get_context("forkserver").Process(
            target=_cli_child, args=(argv, str(cwd or ROOT), env, str(out_path), str(err_path)))
        self._proc.start()
        self.pid = self._proc.pid

    def poll(self) -> int | None:
        return self._popen.poll() if self._popen else self._proc.exitcode

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def wait(self, timeout: float | None = None) -> int:
        if self._popen:
            return self._popen.wait(timeout)
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as its own process (`CliProcess`), run to the end; killed after `timeout`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        proc = CliProcess(list(map(str, args)), out, err, cwd=cwd, env=env)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, Path(out).read_text(),
                                           Path(err).read_text())


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory) -> Path:
    """The model examples/hf-finetune.yaml fine-tunes, made once per session by running
    examples/make_tiny_hf_model.py as a user would (its own process, a bare environment); the
    tests that use it only read it."""
    out = tmp_path_factory.mktemp("tiny-hf") / "model"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_hf_model.py"), "--out",
                    str(out)], check=True, capture_output=True,
                   env={"PYTHONPATH": str(ROOT), "PATH": ""})
    return out
