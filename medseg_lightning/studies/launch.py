"""``medseg train`` as a child process: how sweeps, cross-validation and cross-site studies launch training runs.

A run in its own process cannot take its launcher down when it crashes, runs out of memory or starts DDP ranks
(Lightning's launcher re-runs the command line), and it dies with its launcher, so no run outlives a killed study.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


def medseg_command() -> list[str]:
    """The ``medseg`` entry point of this environment (Lightning's DDP launcher re-runs the same command)."""
    script = Path(sys.executable).with_name("medseg")
    if script.is_file():
        return [str(script)]
    found = shutil.which("medseg")
    return [found] if found else [sys.executable, "-m", "medseg_lightning.cli"]


def override(path: str, value: Any) -> str:
    """``path=value`` with the value as one-line YAML, as ``medseg train --set`` parses it back."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return f"{path}={text.removesuffix('...').strip()}"


def set_options(items: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    return [part for item in items for part in ("--set", item)]


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when its launcher dies, even by SIGKILL, so no run outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch(command: list[str], extra_env: dict[str, str], log_file: Path, cwd: Path) -> int:
    """Runs ``command`` with its output in ``log_file``; returns its exit status (negative: killed by a signal)."""
    env = {**os.environ, **extra_env}
    env.pop("MEDSEG_RUN_ID", None)  # a fresh MLflow run per child
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec,
                                   cwd=cwd)
        with _LIVE_LOCK:
            _LIVE.add(process)
        try:
            return process.wait()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(process)


def terminate_children(timeout: float = 30) -> None:
    """Stops every running child of this process (Ctrl-C, or a kill the launcher survives)."""
    with _LIVE_LOCK:
        processes = list(_LIVE)
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)  # Lightning shuts down gracefully on SIGINT
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()


def failure_reason(code: int, log_file: Path) -> str:
    """The exit status and the last error line of the child's log (full log beside it)."""
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or line.startswith("error:")]
    last = (errors or lines or ["no output"])[-1]
    status = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return f"{status}: {last[:400]} (log: {log_file})"


class DevicePool:
    """Device sets for concurrent training runs (sweep trials, study children): disjoint GPU ids on a GPU machine,
    CPU thread shares otherwise."""

    def __init__(self, jobs: int, devices: int, accelerator: str) -> None:
        gpus = _gpu_count() if accelerator in ("auto", "gpu", "cuda") else 0
        self.gpu = gpus > 0
        if self.gpu and jobs * devices > gpus:
            raise ValueError(f"{jobs} concurrent run(s) x {devices} device(s) need {jobs * devices} GPUs; "
                             f"this machine has {gpus}: lower --jobs or resources.devices")
        self.threads = max(1, (os.cpu_count() or 1) // (jobs * devices))
        self._free: queue.Queue[list[int] | None] = queue.Queue()
        for slot in range(jobs):
            self._free.put(list(range(slot * devices, (slot + 1) * devices)) if self.gpu else None)

    @contextlib.contextmanager
    def acquire(self) -> Iterator[dict[str, str]]:
        """Environment variables that give one run its devices."""
        devices = self._free.get()
        try:
            if devices is None:
                yield {"OMP_NUM_THREADS": str(self.threads)}
            else:
                yield {"CUDA_VISIBLE_DEVICES": ",".join(map(str, devices))}
        finally:
            self._free.put(devices)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def run_process_group(command: list[str]) -> int:
    """Runs a server (``mlflow ui``) in a process group of its own and stops the whole group when this process
    is stopped (SIGTERM, SIGINT, SIGHUP) or exits: ``mlflow ui`` starts uvicorn and huey worker processes that
    would otherwise stay behind, still listening on the port."""
    process = subprocess.Popen(command, start_new_session=True,
                               preexec_fn=None if not sys.platform.startswith("linux") else _die_with_parent)
    stopping = {"signal": 0}
    group = process.pid  # start_new_session: the server leads a group of its own, whose id is its pid
    kill_later = threading.Timer(15, _signal_group, (group, signal.SIGKILL))  # a server that ignores SIGTERM
    kill_later.daemon = True

    def forward(signum: int, _frame: object) -> None:
        # only signal here: the interrupted process.wait() holds the lock that reaping the server needs, so waiting
        # in this handler would always wait out its timeout; the wait returns as soon as the server has exited
        if not stopping["signal"]:
            kill_later.start()
        stopping["signal"] = signum
        _signal_group(group, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        code = process.wait()
    finally:
        kill_later.cancel()
        _stop_group(process, group)  # the workers the server leaves behind, or all of it when this process fails
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + stopping["signal"] if stopping["signal"] else code


def _signal_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def _stop_group(process: subprocess.Popen[bytes], group: int, timeout: float = 15) -> None:
    """Sends SIGTERM to the process group, then kills what is still there after ``timeout`` seconds."""
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return  # the whole group is gone
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(0.2)
    _signal_group(group, signal.SIGKILL)
