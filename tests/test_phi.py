"""Patient identifiers never leave a DICOM series: not in output names, file contents, the store or the console.

The series carries fake identifiers in every tag a de-identification profile removes; `medseg predict` must name
its output after the folder (or an index) and write nothing taken from the headers.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.inference.bundle import build_network, save_bundle

# Fake identifiers, each distinctive enough that a hit anywhere is a leak and not a coincidence.
PHI = {
    "PatientName": "Zyxwell^Quentaria",
    "PatientID": "PID-93817-QX",
    "AccessionNumber": "ACC77123Z",
    "StudyInstanceUID": "1.2.826.0.1.3680043.99.424242",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.99.515151",
    "PatientBirthDate": "19340817",
    "StudyDate": "20230219",
    "SeriesDate": "20230219",
    "AcquisitionDate": "20230219",
    "InstitutionName": "Saint Quentaria Memorial Hospital",
    "SeriesDescription": "T1 AX Zyxwell Quentaria",
    "ReferringPhysicianName": "Vornhald^Ebrecht",
}
# what a leak looks like in text: the name parts, the dates in either form
NEEDLES = sorted({*PHI.values(), "Zyxwell", "Quentaria", "Vornhald", "93817", "77123", "424242", "515151",
                  "19340817", "20230219", "2023-02-19", "1934-08-17"})


def write_series(folder: Path, slices: int = 6, size: tuple[int, int] = (20, 24), seed: int = 0,
                 prefix: str = "IM", **tags: object) -> Path:
    """An axial MR series, one file per slice, carrying the fake identifiers (``tags`` override them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset = FileDataset("slice", {}, file_meta=meta, preamble=b"\0" * 128)
        dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        dataset.Modality = "MR"
        for name, value in {**PHI, "SeriesNumber": 4, **tags}.items():
            setattr(dataset, name, value)
        dataset.InstanceNumber = k + 1
        dataset.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        dataset.ImagePositionPatient = [-10.0, -12.0, 3.0 * k]
        dataset.PixelSpacing = [1.0, 1.0]
        dataset.SliceThickness = 3.0
        dataset.Rows, dataset.Columns = size
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
        dataset.PixelRepresentation = 1
        pixels = (rng.random(size) * 400).astype("<i2")
        dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
        dataset.save_as(folder / f"{prefix}{k:04d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny network saved as a model folder: predicting needs weights, not good ones."""
    root = tmp_path_factory.mktemp("phi_model")
    experiment = root / "exp.yaml"
    experiment.write_text(f"name: phi\ndata:\n  source: {root}\n  labels: {{0: background, 1: organ}}\n"
                          "  preprocessing: {target_size: [32, 32]}\n")
    config = load_config(experiment, ["model.encoder=test_resnet", "trainer.accelerator=cpu"])
    return save_bundle(build_network(config, 1), config, 1, root / "model")


def _leaks(data: bytes) -> list[str]:
    text = data.decode("latin-1").casefold()
    return [needle for needle in NEEDLES if needle.casefold() in text]


def _file_leaks(path: Path) -> list[str]:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data += gzip.decompress(data)
    return [f"{path.name}: {needle}" for needle in _leaks(data) + _leaks(path.name.encode())]


@pytest.mark.parametrize("source", ["folder", "run"])
def test_predicting_a_dicom_series_writes_no_identifier_anywhere(
    source: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    model = str(tiny_model)
    if source == "run":  # a model logged to the project's MLflow store: the store is scanned below too
        from mlflow.tracking import MlflowClient

        from medseg_lightning import tracking

        (tmp_path / "mlruns").mkdir()
        client = MlflowClient(tracking.resolve_store_from_env(tmp_path)[0])
        run = client.create_run(client.create_experiment("phi"))
        tracking.log_model_to_run(client.tracking_uri, run.info.run_id, tiny_model,
                                  np.zeros((1, 1, 32, 32), np.float32), np.zeros((1, 32, 32), np.uint8))
        client.set_terminated(run.info.run_id, "FINISHED")
        model = f"runs:/{run.info.run_id}"
    series = write_series(tmp_path / "inputs" / "series")
    out = tmp_path / "out"
    assert main(["predict", "--model", model, str(series), "--out", str(out), "--overlay"]) == 0
    captured = capfd.readouterr()
    assert not _leaks((captured.out + captured.err).encode()), captured
    written = sorted(path.name for path in out.iterdir())
    assert written == ["series.nii.gz", "series_overlay.png"]  # named after the folder, never a header field
    scanned = [path for path in tmp_path.rglob("*") if path.is_file() and series not in path.parents]
    assert source == "folder" or any(path.name == "mlflow.db" for path in scanned)
    leaks = [leak for path in scanned for leak in _file_leaks(path)]  # outputs, the store, anything created
    assert not leaks


def test_a_folder_of_two_series_is_refused_without_naming_them_by_their_headers(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    mixed = write_series(tmp_path / "mixed", slices=3)
    write_series(mixed, slices=2, seed=1, prefix="LOC", SeriesInstanceUID="1.2.826.0.1.3680043.99.616161",
                 SeriesDescription="LOCALISER Quentaria", SeriesNumber=1)
    assert main(["predict", "--model", str(tiny_model), str(mixed), "--out", str(tmp_path / "out")]) == 1
    captured = capfd.readouterr()
    assert "2 DICOM series" in captured.err and "series number 4: 3 files" in captured.err, captured.err
    assert not _leaks((captured.out + captured.err).encode()) and "616161" not in captured.err, captured.err
