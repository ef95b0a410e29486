"""`medseg data check`: every kind of bad input reported at once, one line each, naming case and file."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.data.check import DataCheckError
from medseg_lightning.data.datamodule import SegmentationDataModule


def _rewrite(path: Path, change) -> None:
    image = nib.load(str(path))
    array, affine = change(np.asanyarray(image.dataobj).copy(), image.affine.copy())
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _nan(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    array[0, 0, :3] = np.nan
    return array, affine


def _shift(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    affine[0, 3] += 5.0
    return array, affine


def _label_seven(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    array[1, 1, 1] = 7
    return array, affine


@pytest.fixture
def broken(tmp_path: Path, cohort: Path) -> Path:
    """A copy of the cohort with one problem per case 000-008 and a duplicated case id."""
    root = tmp_path / "broken"
    shutil.copytree(cohort, root)
    images, labels = root / "imagesTr", root / "labelsTr"
    (images / "synth_000.nii.gz").unlink()
    (images / "synth_001.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    _rewrite(labels / "synth_002.nii.gz", lambda a, f: (a[:, :, :-1], f))
    _rewrite(labels / "synth_003.nii.gz", _shift)
    _rewrite(labels / "synth_004.nii.gz", _label_seven)
    _rewrite(images / "synth_005.nii.gz", _nan)
    _rewrite(images / "synth_006.nii.gz", lambda a, f: (np.full_like(a, 3.0), f))
    manifest = pd.read_csv(root / "manifest.csv", dtype=str)
    pd.concat([manifest, manifest.iloc[[7]]]).to_csv(root / "manifest.csv", index=False)
    return root


EXPECTED = [
    ("synth_000", "imagesTr/synth_000.nii.gz", "file not found"),
    ("synth_001", "imagesTr/synth_001.nii.gz", "unreadable or corrupt file"),
    ("synth_002", "labelsTr/synth_002.nii.gz", "mask shape (32, 32, 9) != image shape (32, 32, 10)"),
    ("synth_003", "labelsTr/synth_003.nii.gz", "mask affine differs from the image affine"),
    ("synth_004", "labelsTr/synth_004.nii.gz", "label values [7] outside the configured classes"),
    ("synth_005", "imagesTr/synth_005.nii.gz", "image has 3 NaN/Inf voxel(s)"),
    ("synth_006", "imagesTr/synth_006.nii.gz", "channel 0 is constant (3.0)"),
    ("synth_007", None, "duplicate case id (2 rows)"),
]


def test_every_bad_input_gets_one_clear_line(broken: Path, make_experiment, capsys) -> None:
    assert main(["data", "check", str(make_experiment(broken))]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ERROR")]
    for case_id, file, message in EXPECTED:
        matching = [line for line in lines if f"case {case_id}" in line and message in line]
        assert len(matching) == 1, f"expected one line for {case_id}: {message}; got {lines}"
        assert file is None or file in matching[0]
    assert len(lines) == len(EXPECTED)


def test_subject_in_two_splits(cohort: Path, make_experiment, tmp_path: Path, capsys) -> None:
    split_file = tmp_path / "splits.csv"
    rows = [f"synth_{i:03d},{'train' if i else 'test'}" for i in range(12)]
    split_file.write_text("case_id,split\n" + "\n".join(rows) + "\n")  # synth_000 and synth_001 share subj_000
    experiment = make_experiment(cohort, split={"method": "file", "file": str(split_file)})
    assert main(["data", "check", str(experiment)]) == 1
    assert "subject subj_000 is in two splits (test and train)" in capsys.readouterr().out


def test_training_refuses_bad_data_before_it_starts(broken: Path, make_experiment) -> None:
    module = SegmentationDataModule(load_config(make_experiment(broken)).data)
    with pytest.raises(DataCheckError, match="8 data problem"):
        module.prepare_data()


def test_good_data_passes(cohort: Path, make_experiment, capsys) -> None:
    assert main(["data", "check", str(make_experiment(cohort))]) == 0
    assert "12 valid case(s) (train 8, val 4, test 0); OK" in capsys.readouterr().out


def test_hippocampus_experiment_passes(data_root: Path, capsys) -> None:
    repo = Path(__file__).resolve().parents[1]
    assert main(["data", "check", str(repo / "experiments" / "hippocampus_unet.yaml")]) == 0
    assert "200 valid case(s) (train 128, val 32, test 40); OK" in capsys.readouterr().out
