"""Manifests: built from common folder layouts, read with subjects and attributes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medseg_lightning.cli import main
from medseg_lightning.data.manifest import ManifestError, build_manifest, load_cases, read_manifest


def _touch_nifti(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(path))


def test_msd_layout_ignores_hidden_files(tmp_path: Path) -> None:
    for case in ("hippo_001", "hippo_002"):
        _touch_nifti(tmp_path / "imagesTr" / f"{case}.nii.gz")
        _touch_nifti(tmp_path / "labelsTr" / f"{case}.nii.gz")
    (tmp_path / "labelsTr" / "._hippo_001.nii.gz").write_bytes(b"macOS metadata")
    table = build_manifest(tmp_path)
    assert table.to_dict("records") == [
        {"case_id": "hippo_001", "image": "imagesTr/hippo_001.nii.gz", "mask": "labelsTr/hippo_001.nii.gz"},
        {"case_id": "hippo_002", "image": "imagesTr/hippo_002.nii.gz", "mask": "labelsTr/hippo_002.nii.gz"},
    ]


def test_nnunet_modalities_become_image_columns(tmp_path: Path) -> None:
    for channel in ("0000", "0001"):
        _touch_nifti(tmp_path / "imagesTr" / f"brats_7_{channel}.nii.gz")
    _touch_nifti(tmp_path / "labelsTr" / "brats_7.nii.gz")
    table = build_manifest(tmp_path)
    assert list(table.columns) == ["case_id", "image_0000", "image_0001", "mask"]


def test_pair_layout_with_mask_suffix_and_unmatched_error(tmp_path: Path) -> None:
    _touch_nifti(tmp_path / "images" / "a.nii.gz")
    _touch_nifti(tmp_path / "masks" / "a_mask.nii.gz")
    assert build_manifest(tmp_path)["mask"].tolist() == ["masks/a_mask.nii.gz"]
    _touch_nifti(tmp_path / "images" / "b.nii.gz")
    with pytest.raises(ManifestError, match="image without a mask or the reverse: b"):
        build_manifest(tmp_path)
    with pytest.raises(ManifestError, match="unknown layout"):
        build_manifest(tmp_path / "images")


def test_read_manifest_subjects_attributes_and_missing_columns(tmp_path: Path) -> None:
    pd.DataFrame({
        "case_id": ["c1", "c2"], "image": ["i/c1.nii.gz", "i/c2.nii.gz"], "mask": ["m/c1.nii.gz", "m/c2.nii.gz"],
        "subject_id": ["s1", ""], "sex": ["F", ""], "site": ["A", "B"],
    }).to_csv(tmp_path / "manifest.csv", index=False)
    cases = read_manifest(tmp_path / "manifest.csv", ["image"])
    assert cases[0].subject_id == "s1" and cases[1].subject_id == "c2"  # defaults to the case id
    assert cases[0].image_paths == [tmp_path / "i/c1.nii.gz"]
    assert cases[1].attribute("sex") == "unknown" and cases[1].attribute("site") == "B"
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['t2'\]"):
        read_manifest(tmp_path / "manifest.csv", ["image", "t2"])


def test_cli_manifest_writes_relative_paths_and_never_overwrites(tmp_path: Path, cohort: Path) -> None:
    out = tmp_path / "elsewhere" / "manifest.csv"
    out.parent.mkdir()
    assert main(["data", "manifest", str(cohort), "--out", str(out)]) == 0
    cases = load_cases(out, ["image"])
    assert len(cases) == 12 and all(case.image_paths[0].resolve().is_file() for case in cases)
    assert main(["data", "manifest", str(cohort), "--out", str(out)]) == 1  # exists: refused
    assert main(["data", "manifest", str(cohort), "--out", str(out), "--force"]) == 0
