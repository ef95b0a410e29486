"""`medseg predict`: training preprocessing, the input's geometry, 2D images, ensembles, errors, no partial files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.data.datamodule import SegmentationDataModule
from medseg_lightning.data.dataset import CaseDataset
from medseg_lightning.data.preprocess import restore_volume
from medseg_lightning.evaluation.scoring import predict_labels
from medseg_lightning.inference.bundle import load_bundle, save_bundle
from medseg_lightning.inference.postprocess import keep_largest_components
from medseg_lightning.tracking import load_logged_bundle
from medseg_lightning.training.train import run

TINY = ["model.encoder=test_resnet", "trainer.accelerator=cpu", "trainer.max_epochs=1", "tracking.log_overlays=0"]


@pytest.fixture(scope="module")
def model(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """A trained tiny model saved as a folder, the experiment and its config."""
    root = tmp_path_factory.mktemp("predict")
    data = {"source": str(cohort), "labels": {0: "background", 1: "organ", 2: "lesion"},
            "preprocessing": {"target_size": [32, 32]}, "split": {"n_folds": 3},
            "loader": {"batch_size": 4, "num_workers": 0}}
    experiment = root / "test.yaml"
    experiment.write_text(yaml.safe_dump({"name": "test", "data": data}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSEG_CACHE_DIR", str(root / "cache"))
        result = run(load_config(experiment, TINY), root=root)
        bundle = load_logged_bundle(f"runs:/{result.run_id}", root)
    folder = save_bundle(bundle.network, bundle.config, bundle.in_channels, root / "model")
    return folder, experiment, bundle


def test_prediction_equals_the_evaluation_pipeline_and_keeps_the_geometry(model, cohort: Path, tmp_path: Path) -> None:
    folder, experiment, bundle = model
    source = cohort / "imagesTr" / "synth_000.nii.gz"
    assert main(["predict", "--model", str(folder), str(source), "--out", str(tmp_path / "out")]) == 0
    written = nib.load(str(tmp_path / "out" / "synth_000.nii.gz"))
    original = nib.load(str(source))
    assert np.allclose(written.affine, original.affine) and written.shape == original.shape[:3]
    assert written.get_data_dtype() == np.uint8
    datamodule = SegmentationDataModule(load_config(experiment).data)
    datamodule.setup()
    item = next(item for item in CaseDataset(datamodule.dataset.cases) if item["case_id"] == "synth_000")
    expected = restore_volume(predict_labels(bundle.network, item["image"], 64), item["meta"])
    assert np.array_equal(np.asarray(nib.as_closest_canonical(written).dataobj), expected)


def test_an_input_in_another_orientation_gets_its_own_geometry_back(model, cohort: Path, tmp_path: Path) -> None:
    folder, _, _ = model
    source = nib.load(str(cohort / "imagesTr" / "synth_001.nii.gz"))
    flipped_affine = source.affine @ np.diag([-1, -1, 1, 1]) + np.array([[0, 0, 0, 31], [0, 0, 0, 31], [0] * 4,
                                                                          [0] * 4]) * np.diag(source.affine)[:4, None]
    flipped = nib.Nifti1Image(np.asarray(source.dataobj)[::-1, ::-1], flipped_affine)  # LPS storage, same world
    nib.save(flipped, str(tmp_path / "lps.nii.gz"))
    nib.save(source, str(tmp_path / "ras.nii.gz"))
    assert main(["predict", "--model", str(folder), str(tmp_path / "lps.nii.gz"), str(tmp_path / "ras.nii.gz"),
                 "--out", str(tmp_path / "out")]) == 0
    lps, ras = (nib.load(str(tmp_path / "out" / f"{name}.nii.gz")) for name in ("lps", "ras"))
    assert np.allclose(lps.affine, flipped_affine) and nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    assert np.array_equal(np.asarray(lps.dataobj)[::-1, ::-1], np.asarray(ras.dataobj))


def test_2d_images_give_png_masks_and_options_work(model, tmp_path: Path) -> None:
    folder, _, _ = model
    Image.fromarray((np.random.default_rng(0).random((40, 36)) * 255).astype(np.uint8)).save(tmp_path / "xray.png")
    assert main(["predict", "--model", str(folder), "--model", str(folder), "--tta", "--largest-component",
                 "--overlay", str(tmp_path / "xray.png"), "--out", str(tmp_path / "out")]) == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "xray.png"))
    assert mask.shape == (40, 36) and mask.dtype == np.uint8 and mask.max() <= 2
    assert (tmp_path / "out" / "xray_overlay.png").is_file()


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj) if path.name.endswith(".nii.gz") else np.asarray(Image.open(path))


def test_uncertainty_maps_keep_the_geometry_and_leave_the_mask_as_it_was(model, cohort: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``--uncertainty`` writes entropy and mutual information beside the same mask, and a score row per case."""
    import pandas as pd

    folder, _, _ = model
    source = cohort / "imagesTr" / "synth_000.nii.gz"
    Image.fromarray((np.random.default_rng(1).random((40, 36)) * 255).astype(np.uint8)).save(tmp_path / "xray.png")
    members = ["--model", str(folder), "--model", str(folder), "--tta"]
    assert main(["predict", *members, str(source), str(tmp_path / "xray.png"), "--out", str(tmp_path / "plain")]) == 0
    out = tmp_path / "unsure"
    assert main(["predict", *members, "--uncertainty", str(source), str(tmp_path / "xray.png"),
                 "--out", str(out)]) == 0
    assert "uncertainty from 6 member(s) (2 model(s) x 3 view(s))" in capsys.readouterr().out
    original = nib.load(str(source))
    for name in ("entropy", "mutual_information"):
        written = nib.load(str(out / f"synth_000_{name}.nii.gz"))
        values = np.asarray(written.dataobj)
        assert np.allclose(written.affine, original.affine) and written.shape == original.shape[:3]
        assert written.get_data_dtype() == np.float32 and values.min() >= 0 and values.max() <= 1
        assert written.header.get_intent()[0] != "label"
        image = np.asarray(Image.open(out / f"xray_{name}.png"))
        assert image.shape == (40, 36) and image.dtype == np.uint8
    assert np.asarray(nib.load(str(out / "synth_000_mutual_information.nii.gz")).dataobj).max() > 0  # flips differ
    for mask in ("synth_000.nii.gz", "xray.png"):
        assert np.array_equal(_pixels(out / mask), _pixels(tmp_path / "plain" / mask)), mask
    scores = pd.read_csv(out / "uncertainty.csv")
    assert list(scores["case"]) == ["synth_000", "xray"]
    assert {"entropy_structure", "entropy_boundary", "uncertain_fraction", "member_agreement"} <= set(scores)
    assert scores["member_agreement"].between(0, 1).all()
    # a rerun does not replace the maps or the scores unasked
    assert main(["predict", *members, "--uncertainty", str(source), "--out", str(out)]) == 1
    assert "use --force" in capsys.readouterr().err


def test_triage_ranks_the_readable_cases_lists_the_broken_and_copies_the_top(
        model, cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    folder, _, _ = model
    inputs = tmp_path / "unlabelled"
    inputs.mkdir()
    for name in ("synth_000", "synth_001", "synth_002"):
        (inputs / f"{name}.nii.gz").write_bytes((cohort / "imagesTr" / f"{name}.nii.gz").read_bytes())
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "triage"
    assert main(["triage", "--model", str(folder), "--tta", str(inputs), "--out", str(out), "--top", "1"]) == 1
    table = pd.read_csv(out / "worklist.csv")
    assert sorted(table["case"]) == ["synth_000", "synth_001", "synth_002"] and list(table["rank"]) == [1, 2, 3]
    values = table["value"].to_numpy()
    defined = values[np.isfinite(values)]
    assert np.all(np.diff(defined) <= 0) and np.isfinite(values).tolist() == sorted(np.isfinite(values).tolist())
    assert {"predicted_volume_ml", "draft_mask", "thumbnail", "member_agreement"} <= set(table)
    for row in table.itertuples():
        assert (out / row.draft_mask).is_file() and (out / row.thumbnail).is_file()
    failed = pd.read_csv(out / "failed.csv")
    assert list(failed["case"]) == ["broken"] and "unreadable" in failed["reason"][0]
    first = table["case"][0]
    assert (out / "to_annotate" / "images" / f"{first}.nii.gz").is_file()
    assert (out / "to_annotate" / "drafts" / f"{first}.nii.gz").read_bytes() == (
        out / "drafts" / f"{first}.nii.gz").read_bytes()
    # the draft is the mask medseg predict writes
    assert main(["predict", "--model", str(folder), "--tta", str(inputs / f"{first}.nii.gz"),
                 "--out", str(tmp_path / "predicted")]) == 0
    draft, predicted = out / "drafts" / f"{first}.nii.gz", tmp_path / "predicted" / f"{first}.nii.gz"
    assert np.array_equal(_pixels(draft), _pixels(predicted))
    before = (out / "worklist.csv").read_bytes()
    capsys.readouterr()
    assert main(["triage", "--model", str(folder), str(inputs), "--out", str(out)]) == 1  # nothing replaced unasked
    assert "use --force" in capsys.readouterr().err and (out / "worklist.csv").read_bytes() == before


def test_triage_puts_cases_without_a_score_first_and_reads_agreement_the_other_way() -> None:
    from medseg_lightning.inference.predict import CaseOutput
    from medseg_lightning.inference.triage import rank_cases

    def case(name: str, entropy: float, agreement: float) -> CaseOutput:
        return CaseOutput(name, Path(f"{name}.nii.gz"), None, 0.0, 1,
                          {"entropy_structure": entropy, "member_agreement": agreement})

    outputs = [case("sure", 0.1, 0.95), case("unsure", 0.6, 0.5), case("empty", float("nan"), 1.0)]
    assert [o.name for o in rank_cases(outputs, "entropy_structure")] == ["empty", "unsure", "sure"]
    assert [o.name for o in rank_cases(outputs, "member_agreement")] == ["unsure", "sure", "empty"]


def test_bad_inputs_get_one_line_and_leave_no_file(model, cohort: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder, _, _ = model
    two_channels = np.stack([np.ones((32, 32, 10), np.float32)] * 2, axis=-1)
    nib.save(nib.Nifti1Image(two_channels, np.eye(4)), str(tmp_path / "dual.nii.gz"))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(folder), str(tmp_path / "dual.nii.gz"), str(tmp_path / "broken.nii.gz"),
                 str(cohort / "imagesTr" / "synth_002.nii.gz"), "--out", str(out)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 2
    assert "dual: 2 channel(s); the model takes 1" in errors[0] and "broken.nii.gz: unreadable" in errors[1]
    assert sorted(p.name for p in out.iterdir()) == ["synth_002.nii.gz"]  # nothing partial, the good one written
    assert main(["predict", "--model", str(tmp_path / "nowhere"), str(tmp_path / "dual.nii.gz"),
                 "--out", str(out)]) == 2
    assert "nowhere: not runs:/" in capsys.readouterr().err


def test_weights_that_do_not_match_their_config_are_refused(model, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder, _, _ = model
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    spec["config"]["model"]["arch"] = "fcn"
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "weights.safetensors").write_bytes((folder / "weights.safetensors").read_bytes())
    (broken / "model.yaml").write_text(yaml.safe_dump(spec))
    assert main(["predict", "--model", str(broken), str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "weights do not match fcn/test_resnet" in error and len(error.splitlines()) == 1


def test_keep_largest_components_per_class() -> None:
    labels = np.zeros((10, 10, 3), np.uint8)
    labels[1:4, 1:4, 1] = 1  # 9 voxels
    labels[7, 7, 1] = 1  # a speck of the same class
    labels[6:8, 1:3, 1] = 2  # another class, untouched when not listed
    labels[9, 9, 2] = 2
    cleaned = keep_largest_components(labels, [1])
    assert cleaned[7, 7, 1] == 0 and cleaned[2, 2, 1] == 1 and (cleaned == 2).sum() == 5
    assert (keep_largest_components(labels, [1, 2]) == 2).sum() == 4


def test_a_dicom_series_gets_a_nifti_mask_with_its_geometry(model, cohort: Path, tmp_path: Path) -> None:
    from medseg_lightning.data.dicom import read_dicom_series

    from .test_dicom import _write_series

    folder, _, _ = model
    stored = np.asarray(nib.load(str(cohort / "imagesTr" / "synth_004.nii.gz")).dataobj).astype(np.int16)
    series = _write_series(tmp_path / "series_a", orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), stored=stored)
    assert main(["predict", "--model", str(folder), str(series), "--out", str(tmp_path / "out")]) == 0
    mask = nib.load(str(tmp_path / "out" / "series_a.nii.gz"))
    assert mask.shape == stored.shape and np.allclose(mask.affine, read_dicom_series(series).affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}


def test_export_cli_writes_an_onnx_model_that_matches(model, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")

    folder, _, bundle = model
    assert main(["export", "--model", str(folder), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    image = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)
    (logits,) = session.run(None, {"image": image})
    with torch.no_grad():
        expected = bundle.network.eval()(torch.from_numpy(image)).numpy()
    assert np.abs(logits - expected).max() < 1e-4


def test_evaluation_scores_the_post_processed_prediction() -> None:
    """With ``inference.largest_component`` the reported Dice is that of the mask ``medseg predict`` writes."""
    from medseg_lightning.evaluation.scoring import score_case

    target = np.zeros((8, 8, 1), np.uint8)
    target[1:4, 1:4] = 1
    prediction = target.copy()
    prediction[6:8, 6:8] = 1  # a false-positive speck apart from the structure
    meta = {"in_plane": {"source": [8, 8], "target": [8, 8], "mode": "none"}, "axis": 2, "spacing": [1.0] * 3,
            "spacing_known": True}
    item = {"meta": meta, "target": target, "case_id": "c", "attributes": {}}
    slices = np.moveaxis(prediction, 2, 0)
    assert score_case(item, slices, {0: "bg", 1: "fg"})["dice/fg"] < 0.9
    assert score_case(item, slices, {0: "bg", 1: "fg"}, [1])["dice/fg"] == 1.0


def test_largest_component_flags_default_to_the_models_setting() -> None:
    from medseg_lightning.cli import build_parser

    parser = build_parser()
    for verb in (["predict", "--model", "m", "scan.nii.gz", "--out", "o"],
                 ["evaluate", "--model", "m", "--data", "e.yaml"]):
        assert parser.parse_args(verb).largest_component is None  # None: the model's inference.largest_component
        assert parser.parse_args([*verb, "--largest-component"]).largest_component is True
        assert parser.parse_args([*verb, "--no-largest-component"]).largest_component is False


class _Ramps(torch.nn.Module):
    """A fixed network that is not flip-equivariant: logits ``[0, a*col + c*x, b*row - c*x]`` depend on where a
    pixel is (a left-right and a top-bottom ramp of different slopes) as well as on its value, so flipping its
    input does not flip its output."""

    def __init__(self, a: float, b: float, c: float) -> None:
        super().__init__()
        self.a, self.b, self.c = a, b, c

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        rows = torch.arange(height, dtype=image.dtype)[:, None].expand(height, width)
        cols = torch.arange(width, dtype=image.dtype)[None, :].expand(height, width)
        return _ramp_logits(image[:, 0], rows, cols, self.a, self.b, self.c)


def _ramp_logits(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, a: float, b: float,
                 c: float) -> torch.Tensor:
    return torch.stack([torch.zeros_like(values), a * cols + c * values, b * rows - c * values], dim=1)


def test_tta_averages_each_flip_put_back_in_place_and_the_ensemble() -> None:
    """``--tta`` predicts the slice and its left-right and top-bottom mirror images and must mirror each of those
    predictions back before averaging (and average over the ensemble's models too). The networks here are not
    flip-equivariant, so a missing un-flip, or one along the wrong axis, gives other probabilities."""
    from medseg_lightning.config.schema import ExperimentConfig
    from medseg_lightning.inference.bundle import ModelBundle
    from medseg_lightning.inference.predict import Predictor

    config = ExperimentConfig(name="tta", data={"source": "unused", "labels": {0: "bg", 1: "left", 2: "low"}})
    nets = [(0.7, 0.4, 1.5), (-0.3, 0.9, -0.8)]
    bundles = [ModelBundle(_Ramps(*net), config, in_channels=1) for net in nets]
    slices = torch.randn(3, 1, 6, 8, generator=torch.Generator().manual_seed(0))  # H != W: axes cannot be swapped
    predictor = Predictor(bundles, tta=True, batch_size=2, device="cpu")  # 2 batches: chunks re-joined in order

    # By hand: on the left-right mirror image the network sees at column w the value of column W-1-w, and its
    # prediction there is put back at column W-1-w; so pixel (h, w) gets the logits of value x[h, w] at column
    # W-1-w. Likewise for rows with the top-bottom mirror image.
    height, width = slices.shape[-2:]
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    views = [(rows, cols), (rows, width - 1 - cols), (height - 1 - rows, cols)]
    values = slices[:, 0]
    expected = sum(torch.softmax(_ramp_logits(values, r, c, *net), dim=1) for net in nets for r, c in views) / 6

    probabilities = predictor.probabilities(slices)
    torch.testing.assert_close(probabilities, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(predictor.labels(slices), expected.argmax(1).to(torch.uint8))
    # the flips matter here: without TTA the average is another one (else this test could not tell)
    plain = sum(torch.softmax(_ramp_logits(values, rows, cols, *net), dim=1) for net in nets) / 2
    assert (Predictor(bundles, tta=False, device="cpu").probabilities(slices) - plain).abs().max() < 1e-6
    assert (probabilities - plain).abs().max() > 0.1


def test_monte_carlo_dropout_members_from_the_command_line(model, cohort: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``--mc-dropout N`` samples a model trained with ``model.head_dropout``: N members, their disagreement as
    mutual information; a model without dropout is refused before anything is written."""
    import pandas as pd

    folder, _, bundle = model
    dropout = bundle.config.model_copy(update={"model": bundle.config.model.model_copy(update={"head_dropout": 0.3})})
    with_dropout = save_bundle(bundle.network, dropout, bundle.in_channels, tmp_path / "dropout")
    source = cohort / "imagesTr" / "synth_000.nii.gz"
    out = tmp_path / "mc"
    assert main(["predict", "--model", str(with_dropout), "--mc-dropout", "4", "--uncertainty", str(source),
                 "--out", str(out)]) == 0
    assert "uncertainty from 4 member(s) (1 model(s) x 1 view(s) x 4 dropout sample(s))" in capsys.readouterr().out
    assert np.asarray(nib.load(str(out / "synth_000_mutual_information.nii.gz")).dataobj).max() > 0
    assert pd.read_csv(out / "uncertainty.csv")["member_agreement"].between(0, 1).all()
    assert main(["predict", "--model", str(folder), "--mc-dropout", "4", str(source),
                 "--out", str(tmp_path / "refused")]) == 2
    assert "has no dropout layer" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_inputs_at_another_scale_than_training_are_refused_naming_both(model, cohort: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A model that does not resample sees a 2x finer scan with every structure twice its trained size: refused,
    as is a 2D image without a pixel size, unless the user says the scale matches (``--ignore-spacing``)."""
    _, _, bundle = model
    fine = save_bundle(bundle.network, bundle.config, bundle.in_channels, tmp_path / "fine", None, (0.5, 0.5, 1.5))
    assert load_bundle(fine).training_spacing == (0.5, 0.5, 1.5)
    source = cohort / "imagesTr" / "synth_000.nii.gz"  # 1 x 1 x 1.5 mm
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "photo.png")
    assert main(["predict", "--model", str(fine), str(source), "--out", str(tmp_path / "a")]) == 1
    error = capsys.readouterr().err
    assert "synth_000: in-plane voxel size 1 x 1 mm; the model was trained on 0.5 x 0.5 mm" in error
    assert "--ignore-spacing" in error and not (tmp_path / "a" / "synth_000.nii.gz").exists()
    assert main(["predict", "--model", str(fine), str(tmp_path / "photo.png"), "--out", str(tmp_path / "b")]) == 1
    assert "photo: no physical pixel size (a 2D image)" in capsys.readouterr().err
    assert main(["predict", "--model", str(fine), "--ignore-spacing", str(source), "--out", str(tmp_path / "c")]) == 0
    same = save_bundle(bundle.network, bundle.config, bundle.in_channels, tmp_path / "same", None, (1.1, 0.9, 3.0))
    assert main(["predict", "--model", str(same), str(source), "--out", str(tmp_path / "d")]) == 0  # within 1.5x
