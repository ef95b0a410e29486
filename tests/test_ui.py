"""The servers: `medseg ui` (MLflow) and `medseg sweep dashboard` (optuna-dashboard); stopping either by its PID
stops the server and every worker it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from medseg_lightning.cli import main
from medseg_lightning.tracking.experiments import describe_experiment


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


def _sweep_file(folder: Path) -> Path:
    """A sweep file whose experiment needs no data: loading it is all the dashboard does with it."""
    (folder / "pyproject.toml").write_text("")
    (folder / "exp.yaml").write_text(yaml.safe_dump({"name": "tiny", "data": {
        "source": "cohort", "labels": {0: "background", 1: "organ"}}}))
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({"experiment": "exp.yaml", "n_trials": 3, "pruner": {"name": "none"}, "space": {
        "optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}))
    return path


def test_sweep_dashboard_without_a_study_says_how_to_start_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = _sweep_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "dashboard", str(path)]) == 2
    error = capsys.readouterr().err
    assert f"no study 'study' in sqlite:///{tmp_path / 'study.optuna.db'} yet" in error, error
    assert f"start it with medseg sweep {path}" in error, error
    assert not (tmp_path / "study.optuna.db").exists(), "looking for the study created an empty database"


@pytest.mark.slow
def test_sweep_dashboard_serves_the_study_and_stops_with_its_process_group(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.optuna.db'}")
    study = optuna.create_study(study_name="study", storage=storage, direction="maximize")
    for value in (0.41, 0.57, 0.52):  # three finished trials, no training
        trial = study.ask()
        trial.suggest_float("optimizer.lr", 1e-4, 1e-2, log=True)
        study.tell(trial, value)
    port = _free_port()
    log = tmp_path / "dashboard.log"
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "medseg_lightning.cli", "sweep", "dashboard", str(path),
                                   "--port", str(port)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not _port_open(port):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/dashboard/studies/{storage.get_study_id_from_name('study')}"
        assert f"open {url}" in log.read_text(), log.read_text()
        with urllib.request.urlopen(url, timeout=30) as page:
            assert page.status == 200 and "<title>Optuna Dashboard</title>" in page.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as answer:
            assert '"study_name": "study"' in answer.read().decode()  # the sweep's own storage
        (leader,) = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
        group = os.getpgid(int(leader))
        assert group != os.getpgid(server.pid), "the dashboard runs in a process group of its own"
        workers = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()
        os.kill(server.pid, signal.SIGINT)
        assert server.wait(60) == 128 + signal.SIGINT
        deadline = time.monotonic() + 30
        while (_port_open(port) or _group_alive(group)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _port_open(port), "the port is still taken after the dashboard stopped"
        assert not _group_alive(group), f"processes of the dashboard ({workers}) are still running"
    finally:
        if server.poll() is None:
            server.kill()


def test_an_experiment_is_described_once_and_keeps_what_the_user_set(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = client.create_experiment("first")
    describe_experiment(client, first, "2D U-Net on 32 cases")
    tags = client.get_experiment(first).tags
    assert tags["mlflow.note.content"] == "2D U-Net on 32 cases"
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(first, "mlflow.note.content", "edited in the UI")
    client.set_experiment_tag(first, "mlflow.experimentKind", "genai_development")  # the UI's other choice
    describe_experiment(client, first, "2D U-Net on 32 cases")
    tags = client.get_experiment(first).tags
    assert (tags["mlflow.note.content"], tags["mlflow.experimentKind"]) == ("edited in the UI", "genai_development")
    second = client.create_experiment("second")
    describe_experiment(client, second, "")  # no description in the config: none is written
    assert "mlflow.note.content" not in client.get_experiment(second).tags


def test_medseg_ui_prints_the_experiments_runs_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from medseg_lightning.studies import launch

    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    experiment = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").create_experiment("quickstart")
    started = []
    monkeypatch.setattr(launch, "run_process_group", lambda command: started.append(command) or 0)
    assert main(["ui", "--port", "5003", "--experiment", "quickstart"]) == 0
    out = capsys.readouterr().out
    assert f"MLflow UI: open http://127.0.0.1:5003/#/experiments/{experiment}/runs" in out, out
    assert started and started[0][1:4] == ["-m", "mlflow", "ui"] and "5003" in started[0]
    assert main(["ui", "--experiment", "quickstrat"]) == 2
    assert "no MLflow experiment 'quickstrat'" in capsys.readouterr().err and len(started) == 1
