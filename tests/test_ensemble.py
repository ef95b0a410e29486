"""Fold ensembles: several saved models as one (mean of softmax), saved, loaded, predicted and exported as one."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.inference.bundle import EnsembleNetwork, build_network, load_bundle, save_bundle, save_ensemble
from medseg_lightning.inference.predict import Predictor


def _config(tmp_path: Path, cohort: Path, **changes: object):
    data = {"source": str(cohort), "labels": {0: "background", 1: "organ", 2: "lesion"},
            "preprocessing": {"target_size": [32, 32]}}
    path = tmp_path / "ensemble.yaml"
    path.write_text(yaml.safe_dump({"name": "ensemble", "data": data}))
    return load_config(path, ["model.encoder=test_resnet", *(f"{k}={v}" for k, v in changes.items())])


@pytest.fixture
def members(tmp_path: Path, cohort: Path) -> list[Path]:
    folders = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        config = _config(tmp_path, cohort)
        network = build_network(config, 1).eval()
        folders.append(save_bundle(network, config, 1, tmp_path / f"member-{seed}"))
    return folders


def test_an_ensemble_folder_loads_as_the_mean_of_its_members_softmax(members: list[Path], tmp_path: Path) -> None:
    ensemble = load_bundle(save_ensemble(members, tmp_path / "ensemble"))
    assert isinstance(ensemble.network, EnsembleNetwork) and len(ensemble.network.members) == 3
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(load_bundle(m).network(x), 1) for m in members]).mean(0)
        assert torch.allclose(torch.softmax(ensemble.network(x), 1), expected, atol=1e-6)
        assert torch.equal(ensemble.network(x).argmax(1), expected.argmax(1))
    # predicting with the ensemble folder is predicting with its members given as several --model
    one = Predictor([ensemble], optimize=False).probabilities(x)
    several = Predictor([load_bundle(m) for m in members], optimize=False).probabilities(x)
    assert torch.allclose(one, several, atol=1e-6)


def test_predict_and_export_take_an_ensemble_folder(members: list[Path], cohort: Path, tmp_path: Path) -> None:
    folder = save_ensemble(members, tmp_path / "ensemble")
    source = cohort / "imagesTr" / "synth_000.nii.gz"
    assert main(["predict", "--model", str(folder), str(source), "--out", str(tmp_path / "one")]) == 0
    assert main(["predict", *(x for m in members for x in ("--model", str(m))), str(source),
                 "--out", str(tmp_path / "several")]) == 0
    one, several = (np.asarray(nib.load(str(tmp_path / name / "synth_000.nii.gz")).dataobj) for name in
                    ("one", "several"))
    assert np.array_equal(one, several)
    onnxruntime = pytest.importorskip("onnxruntime")
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "ensemble.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "ensemble.onnx"))
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = torch.softmax(load_bundle(folder).network(torch.from_numpy(x)), 1).numpy()
    exported = torch.softmax(torch.from_numpy(session.run(None, {"image": x})[0]), 1).numpy()
    assert np.allclose(exported, expected, atol=1e-4)  # the exported graph averages the members' softmax too


def test_members_that_see_other_inputs_cannot_be_averaged(members: list[Path], cohort: Path, tmp_path: Path) -> None:
    other = _config(tmp_path, cohort, **{"data.preprocessing.target_size": "[48, 48]"})
    odd = save_bundle(build_network(other, 1), other, 1, tmp_path / "odd")
    with pytest.raises(ValueError, match="ensemble models must share preprocessing"):
        save_ensemble([members[0], odd], tmp_path / "bad")
