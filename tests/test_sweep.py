"""Optuna sweeps: sweep files, trials as `medseg train` processes, failures, pruning, MLflow nesting, resume."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from medseg_lightning.cli import main
from medseg_lightning.config import ConfigError, load_config
from medseg_lightning.sweep.config import load_sweep
from medseg_lightning.sweep.study import open_storage

from .conftest import REPO
from .postgres import drop_database, fresh_database, postgres_url

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
TINY = {"model": {"encoder": "test_resnet"}, "trainer": {"accelerator": "cpu", "max_epochs": 2},
        "tracking": {"log_overlays": 0}}


@pytest.fixture
def sweep_folder(cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny experiment over the synthetic cohort; the working directory (and MLflow store) is ``tmp_path``."""
    data = {"source": str(cohort), "labels": {0: "background", 1: "organ", 2: "lesion"},
            "preprocessing": {"target_size": [32, 32]}, "split": {"n_folds": 3, "test_fraction": 0.25},
            "loader": {"batch_size": 4, "num_workers": 0}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"name": "tiny", "data": data, **TINY}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write_sweep(folder: Path, name: str = "study", **fields: object) -> Path:
    sweep = {"experiment": "exp.yaml", "n_trials": 3, "sampler": {"name": "random", "seed": 1},
             "pruner": {"name": "none"},
             "space": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}} | fields
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _study(path: Path) -> optuna.Study:
    storage = open_storage(f"sqlite:///{path.with_name(path.stem + '.optuna.db')}")  # may race the sweep's schema
    return optuna.load_study(study_name=path.stem, storage=storage)


def _trial_states(path: Path) -> list[str]:
    """The study's trial states, or none while the sweep process has not created the study yet."""
    if not path.with_name(path.stem + ".optuna.db").exists():
        return []
    try:
        return [t.state.name for t in _study(path).trials]
    except KeyError:  # the database file exists a moment before the study row does
        return []


def _client(folder: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")


def _runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_file_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_DATA_ROOT", "/data-root")
    sweep, experiment = load_sweep(path)
    assert sweep.name == path.stem and sweep.space and experiment.name


def test_sweep_errors_name_the_file_and_field(sweep_folder: Path) -> None:
    bad = _write_sweep(sweep_folder, "bad", space={
        "optimizer.lrr": {"type": "float", "low": 1e-4, "high": 1e-2},
        "model.arch": {"type": "categorical", "choices": ["unet", 3]}})
    with pytest.raises(ConfigError) as error:
        load_sweep(bad)
    lines = sorted(str(error.value).splitlines())
    assert len(lines) == 2 and "bad.yaml: space.model.arch = 3: model.arch: Input should be a valid string" in lines[0]
    assert "bad.yaml: space.optimizer.lrr" in lines[1] and "did you mean 'optimizer.lr'" in lines[1]
    several = _write_sweep(sweep_folder, "several", pruner={"name": "median"},
                           objectives=[{"metric": "val/dice"}, {"metric": "val/hd95/mean", "direction": "minimize"}])
    with pytest.raises(ConfigError, match="pruning needs a single objective"):
        load_sweep(several)


def test_sweep_runs_trials_as_nested_mlflow_runs_and_reports_the_best(
    sweep_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_sweep(sweep_folder, space={
        "optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "model.arch": {"type": "categorical", "choices": ["unet", "fcn"]}})
    assert main(["sweep", str(path)]) == 0
    study = _study(path)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    client = _client(sweep_folder)
    runs = _runs(client)
    (parent,) = [run for run in runs if run.data.tags.get("medseg.kind") == "sweep"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(run.data.tags["optuna.trial"]) for run in children) == [0, 1, 2]
    assert {run.data.tags["optuna.state"] for run in children} == {"COMPLETE"}
    for trial in study.trials:  # each trial's run trained with the trial's parameters
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert float(run.data.params["optimizer.lr"]) == pytest.approx(trial.params["optimizer.lr"])
        assert run.data.params["model.arch"] == trial.params["model.arch"]
        assert run.data.metrics["val/dice"] == pytest.approx(trial.value)
        assert not [key for key in run.data.metrics if key.startswith("test/")]  # trials never look at test
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/complete"] == 3
    assert parent.data.metrics["best/val/dice"] == pytest.approx(study.best_value)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_trials.json", "best_config.yaml", "optimization_history.png"} <= artifacts
    best = Path(client.download_artifacts(parent.info.run_id, "best_config.yaml", str(sweep_folder)))
    config = load_config(best)  # ready for medseg train: the best parameters, no sweep nesting tags
    assert config.optimizer.lr == pytest.approx(study.best_params["optimizer.lr"])
    assert not any(key.startswith(("mlflow.", "optuna.")) for key in config.tracking.tags)
    assert config.trainer.evaluate_test  # the chosen configuration is then tested, once
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 0  # the budget is spent: a rerun starts nothing
    assert len(_study(path).trials) == 3
    assert main(["sweep", "status", str(path)]) == 0
    status = capsys.readouterr().out
    assert "3/3 trials done" in status and "best: trial" in status and "COMPLETE" in status


def test_failed_trials_are_recorded_and_the_sweep_goes_on(sweep_folder: Path) -> None:
    path = _write_sweep(sweep_folder, n_trials=2, max_failures=2, overrides={"optimizer.scheduler": "none"},
                        space={"optimizer.lr": {"type": "float", "low": 1e9, "high": 1e10, "log": True}})
    assert main(["sweep", str(path)]) == 0
    trials = _study(path).trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]  # both attempted, then max_failures stopped it
    assert all("training loss is" in t.user_attrs["fail_reason"] for t in trials)
    children = [run for run in _runs(_client(sweep_folder)) if "optuna.trial" in run.data.tags]
    assert len(children) == 2
    assert {(run.info.status, run.data.tags["optuna.state"]) for run in children} == {("FAILED", "FAIL")}


def test_pruned_trials_stop_early_and_say_so(sweep_folder: Path) -> None:
    path = _write_sweep(sweep_folder, n_trials=1, overrides={"trainer.max_epochs": 3},
                        pruner={"name": "threshold", "lower": 1.01, "n_warmup_steps": 0})
    assert main(["sweep", str(path)]) == 0
    (trial,) = _study(path).trials
    assert trial.state.name == "PRUNED" and trial.user_attrs["epochs"] == 1
    run = _client(sweep_folder).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["optuna.state"] == "PRUNED" and run.info.status == "FINISHED"


@pytest.mark.slow
def test_a_ddp_trial_on_two_cpu_processes(sweep_folder: Path) -> None:
    path = _write_sweep(sweep_folder, n_trials=1, resources={"devices": 2, "accelerator": "cpu"},
                        pruner={"name": "median", "n_startup_trials": 0, "n_warmup_steps": 0})
    assert main(["sweep", str(path)]) == 0
    (trial,) = _study(path).trials
    assert trial.state.name == "COMPLETE"
    run = _client(sweep_folder).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.params["trainer.strategy"] == "ddp" and run.data.params["trainer.devices"] == "2"
    assert run.data.metrics["val/n_cases"] == 4  # every validation case once, gathered from both ranks
    assert len(trial.intermediate_values) == 2  # rank 0 reported every epoch


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_repeating_trials(sweep_folder: Path) -> None:
    path = _write_sweep(sweep_folder, n_trials=3, heartbeat_interval=1, grace_period=3,
                        overrides={"trainer.max_epochs": 3})
    command = [sys.executable, "-m", "medseg_lightning.cli", "sweep", str(path)]
    sweep = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait for one finished trial and a second one running
        time.sleep(1)
        states = _trial_states(path)
        if states[:1] == ["COMPLETE"] and "RUNNING" in states[1:]:
            break
    else:
        sweep.kill()
        pytest.fail("the sweep did not reach its second trial")
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    time.sleep(4)  # past the grace period: the running trial's heartbeat has stopped
    killed = next(t for t in _study(path).trials if t.state.name == "RUNNING")
    assert main(["sweep", str(path)]) == 0
    trials = _study(path).trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and trials[killed.number].state.name == "FAIL"
    assert trials[0].state.name == "COMPLETE" and trials[0].user_attrs["mlflow_run_id"] in {
        t.user_attrs["mlflow_run_id"] for t in complete}  # trial 0 was not run again
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params  # retried with the same parameters
    runs = {int(run.data.tags["optuna.trial"]): run for run in _runs(_client(sweep_folder))
            if "optuna.trial" in run.data.tags}
    if killed.number in runs:  # the killed trial's training process had created its run
        assert runs[killed.number].info.status == "FAILED"
    assert not _alive_trainers(sweep.pid)


def _alive_trainers(parent_pid: int) -> list[str]:
    """``medseg train`` processes still running from the killed sweep (the trial must die with its sweep)."""
    output = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    return [line for line in output.splitlines() if " train " in line and str(parent_pid) in line.split()[1:2]
            and os.getpid() != int(line.split()[0])]


@pytest.mark.slow
@pytest.mark.skipif(not postgres_url(), reason="MEDSEG_TEST_POSTGRES is not set (.ci/run starts a server)")
def test_two_workers_share_one_study_in_postgresql(sweep_folder: Path) -> None:
    optuna_url, mlflow_url = fresh_database("optuna"), fresh_database("mlflow")
    try:
        MlflowClient(mlflow_url).search_experiments()  # the team's tracking database exists before the workers
        path = _write_sweep(sweep_folder, n_trials=4, storage=optuna_url, sampler={"name": "random"})
        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url}
        command = [sys.executable, "-m", "medseg_lightning.cli", "sweep", str(path)]
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(2)  # the first worker creates the study's tables; the second joins while it trains
        second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        outputs = [worker.communicate(timeout=600)[0] for worker in (first, second)]
        assert [first.returncode, second.returncode] == [0, 0], outputs
        assert all(any(line.startswith("trial ") for line in out.splitlines()) for out in outputs)  # both worked
        study = optuna.load_study(study_name="study", storage=optuna_url)
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        assert len(complete) == 4 and len({t.number for t in complete}) == 4
        client = MlflowClient(mlflow_url)
        runs = _runs(client)
        parents = [run for run in runs if run.data.tags.get("medseg.kind") == "sweep"]
        assert len(parents) == 1
        children = {run.info.run_id: run for run in runs
                    if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
        assert {t.user_attrs["mlflow_run_id"] for t in complete} <= set(children)
        assert sorted(int(children[t.user_attrs["mlflow_run_id"]].data.tags["optuna.trial"]) for t in complete) == \
            sorted(t.number for t in complete)
    finally:
        drop_database(optuna_url)
        drop_database(mlflow_url)


def _open_together(url: str, barrier: Any) -> None:
    barrier.wait()
    open_storage(url)  # an error fails the process: exit code 1


def test_workers_that_open_a_new_study_database_together_all_get_it(tmp_path: Path) -> None:
    """Workers started at once on a fresh database race to create its tables; none may fail for it."""
    context = multiprocessing.get_context("fork")
    for attempt in range(4):
        url = f"sqlite:///{tmp_path / f'fresh{attempt}.db'}"
        barrier = context.Barrier(3)
        workers = [context.Process(target=_open_together, args=(url, barrier)) for _ in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert [worker.exitcode for worker in workers] == [0, 0, 0]


def test_concurrent_trials_get_disjoint_gpu_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg_lightning.studies import launch as runner  # the pool sweeps and studies share

    monkeypatch.setattr(runner, "_gpu_count", lambda: 4)
    pool = runner.DevicePool(jobs=2, devices=2, accelerator="auto")
    with pool.acquire() as first, pool.acquire() as second:
        assert {first["CUDA_VISIBLE_DEVICES"], second["CUDA_VISIBLE_DEVICES"]} == {"0,1", "2,3"}
    with pytest.raises(ValueError, match="need 6 GPUs; this machine has 4"):
        runner.DevicePool(jobs=3, devices=2, accelerator="gpu")
    cpu = runner.DevicePool(jobs=2, devices=1, accelerator="cpu")
    with cpu.acquire() as env:
        assert "CUDA_VISIBLE_DEVICES" not in env and int(env["OMP_NUM_THREADS"]) >= 1


@pytest.mark.slow
def test_ctrl_c_stops_the_trials_and_a_rerun_continues(sweep_folder: Path) -> None:
    path = _write_sweep(sweep_folder, n_trials=2, overrides={"trainer.max_epochs": 4})
    command = [sys.executable, "-m", "medseg_lightning.cli", "sweep", str(path)]

    def as_in_a_terminal() -> None:  # default SIGINT handling, own process group (the terminal's foreground job)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.setpgrp()

    sweep = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             preexec_fn=as_in_a_terminal)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
            (sweep_folder / "mlruns" / "sweeps" / "study" / "trial_0000.log").is_file()
            and _trial_states(path) == ["RUNNING"]):
        time.sleep(0.5)
    time.sleep(5)  # inside the trial's training
    os.killpg(sweep.pid, signal.SIGINT)  # Ctrl-C
    assert sweep.wait(60) == 130
    assert [t.state.name for t in _study(path).trials] == ["FAIL"]
    runs = _runs(_client(sweep_folder))
    assert {run.info.run_name: run.info.status for run in runs}["sweep-study"] == "KILLED"
    assert main(["sweep", str(path)]) == 0
    assert [t.state.name for t in _study(path).trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    trial_runs = [run for run in _runs(_client(sweep_folder)) if run.data.tags.get("optuna.trial") == "0"]
    assert all(run.info.status == "FAILED" and run.data.tags["optuna.state"] == "FAIL" for run in trial_runs)


def test_a_resumed_seeded_study_does_not_repeat_its_parameters(sweep_folder: Path) -> None:
    path = _write_sweep(sweep_folder, n_trials=1, overrides={"trainer.max_epochs": 1})
    assert main(["sweep", str(path)]) == 0
    assert main(["sweep", str(path), "--set", "n_trials=2"]) == 0  # a new worker process, same seed
    first, second = _study(path).trials
    assert first.params != second.params


def _first_proposals(sampler: optuna.samplers.BaseSampler) -> list[float]:
    """The values a sampler proposes for three trials of a fresh study (before any modelling: its seeded draws)."""
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=3)
    return [trial.params["x"] for trial in study.trials]


def test_every_sampler_and_pruner_can_be_built() -> None:
    """Each name builds the Optuna class it documents, with the sweep file's settings (checked on the private
    attributes where Optuna exposes no other way to read them)."""
    from medseg_lightning.sweep.config import PrunerConfig, SamplerConfig
    from medseg_lightning.sweep.study import make_pruner, make_sampler

    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "cmaes": optuna.samplers.CmaEsSampler, "nsga2": optuna.samplers.NSGAIISampler}
    for name, cls in samplers.items():
        config = SamplerConfig(name=name, seed=7, n_startup_trials=4)
        assert type(make_sampler(config, 1)) is cls, name
        # the seed reaches the sampler: the same seed proposes the same trials, another seed other ones
        first = _first_proposals(make_sampler(config, 1))
        assert _first_proposals(make_sampler(config, 1)) == first, name
        assert _first_proposals(make_sampler(config.model_copy(update={"seed": 8}), 1)) != first, name
    tpe = make_sampler(SamplerConfig(name="tpe", n_startup_trials=4), 1)
    assert tpe._n_startup_trials == 4 and tpe._multivariate is True
    assert make_sampler(SamplerConfig(name="tpe"), 2)._multivariate is False  # several objectives: independent
    assert make_sampler(SamplerConfig(name="cmaes", n_startup_trials=4), 1)._n_startup_trials == 4

    settings = PrunerConfig(n_startup_trials=4, n_warmup_steps=2, min_resource=2, reduction_factor=4, lower=0.1,
                            upper=0.9)
    median = make_pruner(settings.model_copy(update={"name": "median"}), 5)
    assert type(median) is optuna.pruners.MedianPruner
    assert (median._n_startup_trials, median._n_warmup_steps) == (4, 2)
    hyperband = make_pruner(settings.model_copy(update={"name": "hyperband"}), 5)
    assert type(hyperband) is optuna.pruners.HyperbandPruner
    assert (hyperband._min_resource, hyperband._max_resource, hyperband._reduction_factor) == (2, 5, 4)
    assert make_pruner(settings.model_copy(update={"name": "hyperband"}))._max_resource == "auto"
    threshold = make_pruner(settings.model_copy(update={"name": "threshold"}), 5)
    assert type(threshold) is optuna.pruners.ThresholdPruner
    assert (threshold._lower, threshold._upper, threshold._n_warmup_steps) == (0.1, 0.9, 2)
    assert type(make_pruner(settings.model_copy(update={"name": "none"}), 5)) is optuna.pruners.NopPruner


def test_two_objectives_give_a_pareto_front(sweep_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_sweep(sweep_folder, n_trials=2, sampler={"name": "nsga2", "seed": 0},
                        overrides={"trainer.max_epochs": 1},
                        objectives=[{"metric": "val/dice", "direction": "maximize"},
                                    {"metric": "val/hd95/mean", "direction": "minimize"}])
    assert main(["sweep", str(path)]) == 0
    assert "best: trial" in capsys.readouterr().out
    client = _client(sweep_folder)
    (parent,) = [run for run in _runs(client) if run.data.tags.get("medseg.kind") == "sweep"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.csv", "best_trials.json", "pareto_front.png"} <= artifacts
    with pytest.raises(ValueError, match="several objectives"):
        from medseg_lightning.sweep.session import best_run_id

        front = [t for t in _study(path).best_trials]
        if len(front) == 1:
            raise ValueError("several objectives")  # one trial dominates: nothing more to check here
        best_run_id(path)
