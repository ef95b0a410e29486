"""`medseg ui`: stopping it by its PID stops the MLflow server and every worker it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_medseg_ui_frees_its_port_and_leaves_no_process(tmp_path: Path, sig: signal.Signals) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "medseg_lightning.cli", "ui", "--port", str(port)], cwd=tmp_path,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _port_open(port):
            assert ui.poll() is None and time.monotonic() < deadline, "medseg ui did not start listening"
            time.sleep(0.5)
        children = subprocess.run(["pgrep", "-P", str(ui.pid)], capture_output=True, text=True).stdout.split()
        assert children, "mlflow ui runs as a child process"
        group = os.getpgid(int(children[0]))  # the server's own process group (its workers are in it)
        os.kill(ui.pid, sig)
        ui.wait(60)
        deadline = time.monotonic() + 30
        while (_port_open(port) or _group_alive(group)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _port_open(port), "the port is still taken after medseg ui stopped"
        assert not _group_alive(group), "processes of the MLflow server are still running"
    finally:
        if ui.poll() is None:
            ui.kill()
