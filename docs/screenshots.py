"""Re-takes the documentation's pictures (docs/images/) from a fixture store, with headless Chromium.

    python docs/screenshots.py                 # about 10 minutes on a 2-core CPU; --no-sweep skips the sweep
    python docs/screenshots.py --work /tmp/x   # keep the fixture (cohort, mlruns/) there to look at it

It (a) makes a synthetic cohort with an injected sex gap (``medseg data synth``) and trains two tiny runs on it
(U-Net and FCN on timm's ``test_resnet`` encoder, 32x32 slices, 3 epochs) and a three-trial two-objective sweep,
and a cross-site study over its three sites (a 4-fold cross-validation and one model per held-out site), all with
``medseg`` in a scratch project; (b) starts ``medseg ui`` on that store; (c) captures the MLflow runs
table (the "Model training" view, with ``val/dice``, ``test/dice`` and the sex gap chosen as columns, as the
how-to tells users to click) and the compare view of the two runs; (d) copies the pictures the platform writes
itself: the fairness plot, an overlay grid, the sweep's optimisation history and Pareto front, the cross-site drop
plot.

Chromium comes from the system (``apt-get install chromium``, or ``$MEDSEG_CHROMIUM``), driven by Playwright
(``pip install -e '.[docs]'``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

DOCS = Path(__file__).resolve().parent
EXPERIMENT = {
    "name": "screenshots",
    "description": "Fixture of the documentation's screenshots: a tiny network on a synthetic cohort in which one "
                   "sex is harder to segment by construction",
    "seed": 0,
    "data": {"source": "../data/synthetic", "labels": {0: "background", 1: "organ"}, "label_mapping": {2: 1},
             "preprocessing": {"intensity": {"method": "zscore"}, "target_size": [32, 32]},
             "slicing": {"axis": 2, "background_fraction": 0.2},
             "split": {"n_folds": 4, "fold": 0, "holdout": "test", "val_fraction": 0.2, "stratify_by": "sex"},
             "loader": {"batch_size": 16, "num_workers": 0}},
    "model": {"arch": "unet", "encoder": "test_resnet", "pretrained": "none"},  # timm's tiny test network
    "optimizer": {"lr": 0.003},
    "trainer": {"max_epochs": 3, "accelerator": "cpu"},
    "fairness": {"attributes": ["sex", "site"], "min_group_size": 4, "n_bootstrap": 200},  # a 12-case test split
    "tracking": {"log_overlays": 4},
}
SWEEP = {
    "experiment": "../experiments/screenshots.yaml",
    # the validation split has too few cases per sex for min_group_size 4: the gap would not be measured
    "overrides": {"trainer.max_epochs": 2, "tracking.experiment_name": "screenshots_sweep",
                  "fairness.min_group_size": 2},
    "sampler": {"name": "nsga2", "seed": 0}, "pruner": {"name": "none"},
    "objectives": [{"metric": "val/dice", "direction": "maximize"},
                   {"metric": "val/fairness/sex/dice_gap", "direction": "minimize"}],
    "n_trials": 3,
    "space": {"optimizer.lr": {"type": "float", "low": 0.0003, "high": 0.01, "log": True}},
}
COLUMNS = ["val/dice", "test/dice", "test/fairness/sex/dice_gap"]
TRAINING_KIND = ("mlflow.experimentKind", "custom_model_development")  # what the UI's "Model training" choice sets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS / "images", help="where the PNGs go")
    parser.add_argument("--work", type=Path, help="scratch project for the fixture (default: a temporary folder)")
    parser.add_argument("--port", type=int, default=5391, help="port of medseg ui")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep and its plots")
    parser.add_argument("--reuse", action="store_true",
                        help="--work already holds the fixture: only take the pictures again (after a UI change)")
    args = parser.parse_args()
    chromium = os.environ.get("MEDSEG_CHROMIUM") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if chromium is None:
        sys.exit("no Chromium: apt-get install chromium, or set MEDSEG_CHROMIUM")
    work = args.work or Path(tempfile.mkdtemp(prefix="medseg_screenshots_"))
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["MEDSEG_CACHE_DIR"] = str(work / "cache")
    if not args.reuse:
        build_fixture(work, env, sweep=not args.no_sweep)
    mark_as_training(work)
    args.out.mkdir(parents=True, exist_ok=True)
    copy_pictures(work, args.out)
    with ui(work, env, args.port) as url:
        capture(url, experiment_id(work), chromium, args.out)
    print(f"pictures in {args.out}; fixture in {work}")
    return 0


def medseg(work: Path, env: dict[str, str], *arguments: str) -> None:
    command = [str(Path(sys.executable).with_name("medseg")), *arguments]
    if not Path(command[0]).is_file():
        command = [sys.executable, "-m", "medseg_lightning.cli", *arguments]
    print("$ medseg", " ".join(arguments), flush=True)
    subprocess.run(command, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)


def build_fixture(work: Path, env: dict[str, str], sweep: bool) -> None:
    """A scratch project (its own ``mlruns/``) with two training runs and, with ``sweep``, a three-trial sweep."""
    for folder in ("experiments", "sweeps", "mlruns"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    (work / "experiments" / "screenshots.yaml").write_text(yaml.safe_dump(EXPERIMENT, sort_keys=False))
    (work / "sweeps" / "screenshots.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    medseg(work, env, "data", "synth", "--out", "data/synthetic", "--cases", "48", "--shape", "32", "32", "8",
           "--hard-group", "sex=F", "--force")
    if sweep:  # first, and in an experiment of its own: the two training runs are the runs table's top rows
        medseg(work, env, "sweep", "sweeps/screenshots.yaml")
    # in an experiment of its own too, so its parent runs do not push the two training runs down the table; and
    # before them, so the newest fairness plot (the one copied) is a training run's, not the study's pooled one
    medseg(work, env, "crosssite", "experiments/screenshots.yaml", "--attribute", "site",
           "--set", "tracking.experiment_name=screenshots_crosssite")
    for arch in ("unet", "fcn"):
        medseg(work, env, "train", "experiments/screenshots.yaml", "--set", f"model.arch={arch}")


def mark_as_training(work: Path) -> None:
    """The experiment opens as a training experiment (the kind the UI's toggle would otherwise have to be set to)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store(work))
    experiment = client.get_experiment_by_name(EXPERIMENT["name"])
    if TRAINING_KIND[0] not in experiment.tags:  # recent medseg versions set it when they create the experiment
        client.set_experiment_tag(experiment.experiment_id, *TRAINING_KIND)


def store(work: Path) -> str:
    return f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"


def experiment_id(work: Path) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(store(work)).get_experiment_by_name(EXPERIMENT["name"]).experiment_id


def newest(work: Path, pattern: str) -> Path | None:
    found = sorted((work / "mlruns").rglob(pattern), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def copy_pictures(work: Path, out: Path) -> None:
    """The PNGs the platform writes as run artifacts, copied under the names the pages use."""
    wanted = {"fairness_sex.png": "test_fairness_sex.png", "overlay_grid.png": "overlays/epoch_003/*.png",
              "sweep_optimization_history.png": "optimization_history_0.png",
              "sweep_pareto_front.png": "pareto_front.png", "crosssite_site.png": "crosssite_site.png"}
    for name, pattern in wanted.items():
        source = newest(work, pattern)
        if source is None:
            print(f"not made by this fixture: {pattern} (skipped {name})")
            continue
        shutil.copyfile(source, out / name)
        print(f"{name} <- {source.relative_to(work)}")


class ui:
    """``medseg ui`` in its own process group, stopped as a whole (the MLflow server starts worker processes)."""

    def __init__(self, work: Path, env: dict[str, str], port: int) -> None:
        self.work, self.env, self.port = work, env, port

    def __enter__(self) -> str:
        command = [str(Path(sys.executable).with_name("medseg")), "ui", "--port", str(self.port)]
        self.process = subprocess.Popen(command, cwd=self.work, env=self.env, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + 300  # its workers import MLflow: slow on a busy machine
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "health", timeout=5):
                    return url
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"medseg ui exited with {self.process.returncode}") from None
                time.sleep(2)
        self.__exit__()
        raise RuntimeError(f"medseg ui did not answer on {url} within 5 minutes")

    def __exit__(self, *_: object) -> None:
        self.process.send_signal(signal.SIGTERM)  # medseg ui stops the MLflow server's process group, then exits
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            print(f"medseg ui (pid {self.process.pid}) did not stop within 2 minutes; stop it by hand")


def runs_table_state() -> dict[str, object]:
    """The runs table's saved view in MLflow 3.17's UI: its defaults, with the metric columns of the how-to."""
    return {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
            "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "selectedColumns": [f"metrics.`{column}`" for column in COLUMNS], "columnOrder": [],
            "columnWidths": {}, "runsExpanded": {}, "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {},
            "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False, "runListHidden": False,
            "isAccordionReordered": False, "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
            "groupBy": None, "groupsExpanded": {}, "autoRefreshEnabled": True,
            "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}}


def capture(url: str, experiment: str, chromium: str, out: Path) -> None:
    """The runs table with the metric columns chosen, then the two runs in the compare view."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1440, "height": 810}, device_scale_factor=1)
        # A fresh browser, minus MLflow's assistant panel (it would cover a third of the picture), with the columns
        # chosen that the how-to tells users to tick under "Columns" (the UI keeps that choice in localStorage; the
        # picker lists every metric, too many to click through reliably).
        page.add_init_script(f"""
            localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
            localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
            localStorage.setItem({json.dumps(f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment}"]-ReactComponentState')},
                                 {json.dumps(json.dumps(runs_table_state()))});""")
        page.goto(f"{url}#/experiments/{experiment}/runs")
        page.get_by_text("Model training", exact=True).first.click()  # what the how-to tells users to click
        for column in COLUMNS:  # the chosen columns are in the table's header
            page.get_by_text(column, exact=True).first.wait_for(timeout=120_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=out / "mlflow_runs_table.png")
        print("mlflow_runs_table.png")
        # the two training runs' rows (named <experiment>-<date>-<time>), ticked as a user does: the grid renders
        # more checkbox inputs than it shows, so a box is found through its row, not by its index
        rows = page.get_by_role("row").filter(has_text=f"{EXPERIMENT['name']}-")
        for index in (0, 1):
            rows.nth(index).get_by_role("checkbox").first.click()
            page.wait_for_timeout(500)
        page.get_by_role("button", name="Compare").first.click()
        page.get_by_text("Parameters", exact=False).first.wait_for(timeout=60_000)
        page.wait_for_timeout(3000)
        pickers = page.get_by_role("combobox")  # Parameters, then Metrics, of the parallel coordinates plot
        if pickers.count() >= 2:  # the how-to's metrics on the plot, picked as a user would: type, Enter
            pickers.nth(1).click()
            for column in COLUMNS:
                page.keyboard.type(column)
                page.wait_for_timeout(500)
                page.keyboard.press("Enter")
                page.wait_for_timeout(500)
            page.keyboard.press("Escape")
        page.wait_for_timeout(3000)  # the plots draw after the tables
        page.screenshot(path=out / "mlflow_compare_runs.png")
        print("mlflow_compare_runs.png")
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
