"""The preprocessing cache: second pass reads no source file, changed files or settings miss the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_lightning.config import load_config
from medseg_lightning.data import cache as cache_module
from medseg_lightning.data.check import prepare_dataset


def test_second_pass_decodes_nothing(cohort: Path, make_experiment, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(make_experiment(cohort)).data
    first = prepare_dataset(config)
    assert not first.problems and len(first.cases) == 12

    def fail(*args: object) -> None:
        raise AssertionError("a cached case was decoded again")

    monkeypatch.setattr(cache_module, "read_image", fail)
    second = prepare_dataset(config)
    assert second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(second.cases[3].image, first.cases[3].image)
    assert isinstance(second.cases[0].image.base, np.memmap)  # a view of the memory-mapped file


def test_changed_setting_or_file_invalidates(tmp_path: Path, cohort: Path, make_experiment) -> None:
    data = tmp_path / "cohort"
    shutil.copytree(cohort, data)
    experiment = make_experiment(data)
    base = prepare_dataset(load_config(experiment).data)
    resized = prepare_dataset(load_config(experiment, ["data.preprocessing.target_size=[24, 24]"]).data)
    assert resized.cases[0].image.shape[-2:] == (24, 24)
    assert resized.fingerprint["fingerprint"] != base.fingerprint["fingerprint"]
    # a changed image file: same shape, new content
    path = data / "imagesTr" / "synth_000.nii.gz"
    image = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj) * 2 + 5, image.affine, image.header), str(path))
    changed = prepare_dataset(load_config(experiment).data)
    assert changed.fingerprint["fingerprint"] != base.fingerprint["fingerprint"]
    assert changed.cases[0].meta["key"] != base.cases[0].meta["key"]
    assert changed.cases[1].meta["key"] == base.cases[1].meta["key"]  # other cases stay cached


def test_fingerprint_content(cohort: Path, make_experiment) -> None:
    fingerprint = prepare_dataset(load_config(make_experiment(cohort)).data).fingerprint
    assert fingerprint["n_cases"] == 12 and fingerprint["n_subjects"] == 6
    assert fingerprint["spacing_mm"]["median"] == [1.0, 1.0, 1.5]
    assert set(fingerprint["labels"]) == {"background", "organ", "lesion"}
    assert 0 < fingerprint["labels"]["organ"]["voxel_fraction"] < 0.5
    assert "synth_000" not in str(fingerprint)  # no case or patient identifiers
