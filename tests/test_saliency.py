"""Saliency: Grad-CAM and integrated gradients of a segmentation, the randomisation check, explain and the card."""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.data.datamodule import SegmentationDataModule
from medseg_lightning.data.dataset import CaseDataset
from medseg_lightning.inference.saliency import default_stage, rank_similarity, saliency_maps, stage_module
from medseg_lightning.tracking import load_logged_bundle
from medseg_lightning.training.train import RunResult

from .test_evaluate import _artifacts, trained  # noqa: F401 (the module's trained model)


def _test_cases(result: RunResult, root: Path, experiment: Path) -> tuple[torch.nn.Module, list[dict]]:
    bundle = load_logged_bundle(f"runs:/{result.run_id}", root)
    datamodule = SegmentationDataModule(load_config(experiment).data, seed=0)
    datamodule.setup()
    dataset = CaseDataset(datamodule.dataset.split("test"), 0)
    return bundle.network.eval(), [dataset[index] for index in range(len(dataset))]


def _randomised(network: torch.nn.Module) -> torch.nn.Module:
    """The same architecture with every layer re-initialised (Adebayo et al.'s cascading randomisation, all at once)."""
    copied = copy.deepcopy(network)
    torch.manual_seed(5)
    for module in copied.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return copied


def test_gradcam_maps_depend_on_the_learnt_weights(trained: tuple[RunResult, Path, Path]) -> None:  # noqa: F811
    """The randomisation sanity check: a map that looks the same for a trained and a randomised model explains
    the architecture or the image, not what was learnt. Grad-CAM's maps must differ clearly (rank correlation
    well below the 1.0 of a map with itself)."""
    result, root, experiment = trained
    network, items = _test_cases(result, root, experiment)
    random = _randomised(network)
    similarities, repeats = [], []
    for item in items[:3]:
        with torch.no_grad():
            region = network(item["image"]).argmax(1).numpy()
        if not region.any():
            continue
        rows = (region > 0).reshape(len(region), -1).any(1)
        trained_maps = saliency_maps(network, item["image"], region, ("gradcam",)).maps["gradcam"]
        again = saliency_maps(network, item["image"], region, ("gradcam",)).maps["gradcam"]
        random_maps = saliency_maps(random, item["image"], region, ("gradcam",)).maps["gradcam"]
        repeats.append(rank_similarity(trained_maps[rows], again[rows]))
        similarities.append(rank_similarity(trained_maps[rows], random_maps[rows]))
        assert np.all(trained_maps[~rows] == 0)  # slices without the region have nothing to explain
        assert trained_maps.min() >= 0 and trained_maps.max() <= 1
    assert similarities, "the trained model predicted no structure in the test cases"
    assert min(repeats) > 0.999  # deterministic
    assert np.mean(similarities) < 0.5, similarities


def test_the_gradcam_stage_is_fine_enough_for_small_structures(trained) -> None:  # noqa: F811
    result, root, experiment = trained
    network, _ = _test_cases(result, root, experiment)
    reductions = network.encoder.reductions
    assert reductions[default_stage(reductions)] <= 8
    assert default_stage([2, 4, 8, 16, 32]) == 2 and default_stage([16, 32]) == 1
    assert isinstance(stage_module(network, 0), torch.nn.Module)
    with pytest.raises(ValueError, match=r"--stage 9: the encoder has stages 0\.\.4"):
        stage_module(network, 9)


def test_explain_writes_maps_in_the_inputs_geometry_and_protects_them(
    trained: tuple[RunResult, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    capsys: pytest.CaptureFixture[str], cohort: Path,
) -> None:
    result, root, _ = trained
    monkeypatch.chdir(root)
    source = sorted((cohort / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "explained"
    assert main(["explain", "--model", f"runs:/{result.run_id}", str(source), "--out", str(out)]) == 0
    name = source.name.removesuffix(".nii.gz")
    printed = capsys.readouterr().out
    assert "1 of 1 case(s) explained" in printed
    reference = nib.load(source)
    for method in ("gradcam", "integrated_gradients"):
        image = nib.load(out / f"{name}_{method}.nii.gz")
        assert image.shape == reference.shape and np.allclose(image.affine, reference.affine)
        values = np.asarray(image.dataobj)
        assert values.min() >= 0 and values.max() <= 1
    mask = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
    assert (out / f"{name}_saliency.png").stat().st_size > 0 and mask.any()

    before = (out / f"{name}_gradcam.nii.gz").read_bytes()
    assert main(["explain", "--model", f"runs:/{result.run_id}", str(source), "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err and (out / f"{name}_gradcam.nii.gz").read_bytes() == before
    assert main(["explain", "--model", f"runs:/{result.run_id}", str(source), "--out", str(tmp_path / "one"),
                 "--class", "lesion", "--method", "gradcam"]) == 0
    assert not (tmp_path / "one" / f"{name}_integrated_gradients.nii.gz").exists()
    assert main(["explain", "--model", f"runs:/{result.run_id}", str(source), "--out", str(tmp_path / "two"),
                 "--class", "tumour"]) == 2
    assert "the model's classes are organ, lesion" in capsys.readouterr().err


def test_training_logs_the_saliency_of_its_best_and_worst_test_case(trained) -> None:  # noqa: F811
    result, root, _ = trained
    assert load_logged_bundle(f"runs:/{result.run_id}", root).training_spacing == (1.0, 1.0, 1.5)  # the cohort's
    client = MlflowClient(result.tracking_uri)
    assert "metrics/test_saliency.png" in _artifacts(client, result.run_id)
    card = Path(client.download_artifacts(result.run_id, "model_card/model_card.md")).read_text()
    assert "### Saliency" in card and "metrics/test_saliency.png" in card and "worst test case" in card
