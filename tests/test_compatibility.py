"""Models logged by an earlier medseg still load, predict the same masks and export.

``tests/fixtures/legacy_store`` was written by ``tests/fixtures/make_legacy_store.sh`` at the commit named in its
``made_by_commit`` file, before the package was regrouped by pipeline stage: a store with one registered tiny U-Net
(``legacy-unet@champion``), an input case and the mask that version predicted for it.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_lightning.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_store"
WRITTEN_AT = "/tmp/medseg-legacy-store"  # where the fixture's store lived when it was written


def _relocate(store: Path, old: str, new: str) -> None:
    """Points the copied store at its new place: MLflow records absolute artifact locations in its database and in
    each model's MLmodel file."""
    connection = sqlite3.connect(store / "mlflow.db")
    tables = [row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")]
    for table in tables:
        for column in [row[1] for row in connection.execute(f"pragma table_info({table})")]:
            connection.execute(f"update {table} set {column} = replace({column}, ?, ?) "
                               f"where typeof({column}) = 'text' and instr({column}, ?) > 0", (old, new, old))
    connection.commit()
    connection.close()
    for path in store.rglob("*"):
        if path.is_file() and path.suffix in ("", ".yaml", ".json") and path.name != "mlflow.db":
            text = path.read_text(errors="ignore")
            if old in text:
                path.write_text(text.replace(old, new))


@pytest.fixture
def legacy_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    _relocate(tmp_path / "mlruns", WRITTEN_AT, str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.mark.parametrize("spec", ["models:/legacy-unet@champion", "models:/legacy-unet/1", "runs:/RUN"])
def test_a_model_logged_by_an_earlier_version_predicts_the_same_mask(legacy_project: Path, spec: str) -> None:
    spec = spec.replace("RUN", (legacy_project / "run_id").read_text().strip())
    assert main(["predict", "--model", spec, "input", "--out", "predicted"]) == 0
    expected = _mask(legacy_project / "expected_case.nii.gz")
    predicted = _mask(legacy_project / "predicted" / "case.nii.gz")
    assert predicted.shape == expected.shape and expected.any()  # the old model found foreground
    assert (predicted == expected).mean() >= 0.999  # the same mask (a voxel may flip on another CPU's arithmetic)


def test_a_model_logged_by_an_earlier_version_exports_to_onnx(legacy_project: Path) -> None:
    pytest.importorskip("onnxruntime")
    assert main(["export", "--model", "models:/legacy-unet@champion", "--out", "legacy.onnx"]) == 0
    assert (legacy_project / "legacy.onnx").stat().st_size > 0
