"""Loading a logged model never runs code from the artifact store, and logged models hold no local paths."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.training.train import run

TINY = ["model.encoder=test_resnet", "trainer.accelerator=cpu", "trainer.max_epochs=1", "tracking.log_overlays=0"]


@pytest.fixture(scope="module")
def logged(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("safety")
    data = {"source": str(cohort), "labels": {0: "background", 1: "organ", 2: "lesion"},
            "preprocessing": {"target_size": [32, 32]}, "split": {"n_folds": 3, "test_fraction": 0.2},
            "loader": {"batch_size": 4, "num_workers": 0}}
    experiment = root / "safety.yaml"
    experiment.write_text(yaml.safe_dump({"name": "safety", "data": data}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
        result = run(load_config(experiment, TINY), root=root)
    return root, experiment, result.run_id


def _model_folder(root: Path) -> Path:
    [mlmodel] = list((root / "mlruns" / "artifacts").rglob("MLmodel"))
    return mlmodel.parent


def test_a_tampered_model_file_is_not_run_by_predict_evaluate_or_export(logged: tuple[Path, Path, str],
                                                                         cohort: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root, experiment, run_id = logged
    monkeypatch.chdir(root)
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
    marker = tmp_path / "code-ran"
    scripts = [path for path in _model_folder(root).rglob("*.py")]
    assert scripts  # the pyfunc file and the code copy stored with the model
    for path in scripts:  # what an attacker with write access to the artifact store would do
        path.write_text(path.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    source = cohort / "imagesTr" / "synth_000.nii.gz"
    assert main(["predict", "--model", f"runs:/{run_id}", str(source), "--out", str(tmp_path / "out")]) == 0
    assert main(["evaluate", "--model", f"runs:/{run_id}", "--data", str(experiment)]) == 0
    pytest.importorskip("onnxruntime")
    assert main(["export", "--model", f"runs:/{run_id}", "--out", str(tmp_path / "m.onnx")]) == 0
    assert not marker.exists(), "a command imported code from the artifact store"
    with mlflow.utils.file_utils.TempDir():  # the check above could not pass by accident: pyfunc runs it
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
        mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert marker.exists()


def test_a_model_saved_by_a_newer_format_is_refused_with_advice(logged: tuple[Path, Path, str],
                                                                tmp_path: Path) -> None:
    from medseg_lightning.inference.bundle import SPEC_FILE, load_bundle

    root, _, _ = logged
    bundle = _model_folder(root) / "artifacts" / "bundle"
    spec = yaml.safe_load((bundle / SPEC_FILE).read_text())
    assert spec["format"] == 1 and spec["medseg_version"]
    copied = tmp_path / "newer"
    copied.mkdir()
    (copied / "weights.safetensors").write_bytes((bundle / "weights.safetensors").read_bytes())
    (copied / SPEC_FILE).write_text(yaml.safe_dump({**spec, "format": 99, "medseg_version": "9.0"}))
    with pytest.raises(ValueError, match=r"saved by medseg 9\.0 in model format 99.*upgrade medseg-lightning"):
        load_bundle(copied)


def test_logged_models_and_cards_hold_no_local_paths(logged: tuple[Path, Path, str]) -> None:
    """Neither the checkout, the project folder nor the home folder appears in what the store keeps (MLflow's own
    ``artifact_path`` line, where the store put the model, aside)."""
    import medseg_lightning

    root, _, _ = logged
    folders = [str(root), str(Path.home()), str(Path(medseg_lightning.__file__).parents[1])]
    offenders = []
    for path in (root / "mlruns" / "artifacts").rglob("*"):
        if not path.is_file() or path.suffix not in (".yaml", ".json", ".md", ".html", ".txt", ""):
            continue
        lines = [line for line in path.read_text(errors="ignore").splitlines() if not line.startswith("artifact_path:")]
        offenders += [f"{path.relative_to(root)}: {line.strip()}" for line in lines
                      if any(folder in line for folder in folders)]
    assert not offenders


def test_a_logged_model_names_its_data_without_this_machines_folders(logged: tuple[Path, Path, str],
                                                                      cohort: Path) -> None:
    """The run's config.yaml keeps the data path (to rerun the experiment here); the model, which travels to other
    machines and the registry, keeps only the data folder's name when it lay outside the working folder."""
    root, _, _ = logged
    spec = yaml.safe_load((_model_folder(root) / "artifacts" / "bundle" / "model.yaml").read_text())
    assert spec["config"]["data"]["source"] == cohort.name
    model_files = [path for path in _model_folder(root).rglob("*") if path.is_file() and path.suffix in (".yaml", "")]
    assert not [path for path in model_files if str(cohort) in path.read_text(errors="ignore")]
