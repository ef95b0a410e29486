"""Slice folders (the LGG kaggle_3m layout): one volume per patient, numeric slice order, clear data-check lines."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from medseg_lightning.cli import main
from medseg_lightning.data.io import read_image, read_mask

SLICES = {"TCGA_AA_0001_20000101": 11, "TCGA_BB_0002_20000202": 4, "TCGA_CC_0003_20000303": 5}


def _write_cohort(root: Path) -> Path:
    """Cases of 8x8 RGB slices whose first channel holds the slice number; masks 0/255."""
    rng = np.random.default_rng(0)
    for case, count in SLICES.items():
        folder = root / case
        folder.mkdir(parents=True)
        for number in range(1, count + 1):
            image = np.zeros((8, 8, 3), np.uint8)
            image[..., 0] = number
            image[..., 1:] = rng.integers(0, 255, (8, 8, 2))
            mask = np.zeros((8, 8), np.uint8)
            mask[2:5, 3:6] = 255 if number % 2 else 0
            tifffile.imwrite(folder / f"{case}_{number}.tif", image)
            tifffile.imwrite(folder / f"{case}_{number}_mask.tif", mask)
    return root


@pytest.fixture
def slice_cohort(tmp_path: Path) -> Path:
    return _write_cohort(tmp_path / "lgg")


def _experiment(folder: Path, source: Path) -> Path:
    path = folder / "slices.yaml"
    path.write_text(f"name: slices\ndata:\n  source: {source}\n  labels: {{0: background, 1: abnormality}}\n"
                    "  label_mapping: {255: 1}\n  image_columns: [image]\n  split: {n_folds: 3}\n")
    return path


def test_a_slice_folder_is_one_volume_in_numeric_slice_order(slice_cohort: Path) -> None:
    folder = slice_cohort / "TCGA_AA_0001_20000101"
    image = read_image([folder])
    assert image.array.shape == (3, 8, 8, 11) and not image.spacing_known
    assert image.array[0, 0, 0].tolist() == list(range(1, 12))  # _10 and _11 after _9, not after _1
    mask = read_mask(folder)
    assert mask.array.shape == (8, 8, 11) and set(np.unique(mask.array)) == {0, 255}


def test_manifest_and_check_of_a_slice_folder_dataset(slice_cohort: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "manifest", str(slice_cohort)]) == 0
    table = pd.read_csv(slice_cohort / "manifest.csv")
    assert table["case_id"].tolist() == sorted(SLICES) and (table["image"] == table["mask"]).all()
    assert main(["data", "check", str(_experiment(tmp_path, slice_cohort / "manifest.csv"))]) == 0
    assert "3 valid case(s)" in capsys.readouterr().out


def test_each_bad_slice_folder_gets_one_line_naming_the_file(slice_cohort: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    a, b, c = (slice_cohort / case for case in SLICES)
    (a / f"{a.name}_3_mask.tif").unlink()  # a slice without its mask
    (b / f"{b.name}_2.tif").unlink()  # a mask without its slice, which also leaves a gap
    tifffile.imwrite(c / f"{c.name}_4.tif", np.zeros((9, 8, 3), np.uint8))  # a slice of another size
    extra = slice_cohort / "TCGA_DD_0004_20000404"
    shutil.copytree(c, extra)
    for path in extra.iterdir():
        path.rename(extra / path.name.replace(c.name, extra.name))
    tifffile.imwrite(extra / f"{extra.name}_1_mask.tif", np.full((8, 8), 128, np.uint8))  # an unmapped value
    tifffile.imwrite(extra / f"{extra.name}_4.tif", np.zeros((8, 8, 3), np.uint8))
    gap = slice_cohort / "TCGA_EE_0005_20000505"
    shutil.copytree(extra, gap)
    for path in gap.iterdir():
        path.rename(gap / path.name.replace(extra.name, gap.name))
    for suffix in (".tif", "_mask.tif"):
        (gap / f"{gap.name}_2{suffix}").unlink()  # a hole in the numbering
    assert main(["data", "manifest", str(slice_cohort)]) == 0
    assert main(["data", "check", str(_experiment(tmp_path, slice_cohort / "manifest.csv"))]) == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 5, errors
    text = "\n".join(errors)
    assert f"{a.name}_3.tif: slice 3 has no mask" in text
    assert f"{b.name}_2_mask.tif: mask of slice 2 has no image" in text
    assert f"{c.name}_4.tif: shape (9, 8)" in text
    assert "128" in text and extra.name in text
    assert f"{gap.name}: slice number(s) [2] missing between 1 and 5" in text


@pytest.mark.slow
def test_the_lgg_dataset_passes_manifest_and_check(data_root: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "manifest.csv"
    assert main(["data", "manifest", str(data_root / "lgg"), "--out", str(manifest)]) == 0
    assert len(pd.read_csv(manifest)) == 88
    assert main(["data", "check", str(_experiment(tmp_path, manifest))]) == 0
    assert "88 valid case(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_lgg_attributes_come_from_the_table_and_the_case_ids(data_root: Path, tmp_path: Path) -> None:
    from collections import Counter

    from medseg_lightning.config import load_config
    from medseg_lightning.data.check import prepare_dataset

    manifest = tmp_path / "manifest.csv"
    assert main(["data", "manifest", str(data_root / "lgg"), "--out", str(manifest)]) == 0
    repo = Path(__file__).resolve().parents[1]
    config = load_config(repo / "experiments" / "lgg_flair.yaml", [f"data.source={manifest}"])
    dataset = prepare_dataset(config.data, tmp_path / "cache")
    assert dataset.problems == []
    counts = {name: Counter(item.case.attribute(name) for item in dataset.cases) for name in ("sex", "site")}
    assert counts["sex"] == {"F": 45, "M": 42, "unknown": 1}  # the counts ../shared/data/README.md gives
    assert counts["site"] == {"DU": 36, "HT": 27, "CS": 13, "FG": 11, "EZ": 1}


def test_predict_on_a_slice_folder_writes_one_mask_per_slice_in_source_values(slice_cohort: Path,
                                                                                tmp_path: Path) -> None:
    import torch
    from PIL import Image

    from medseg_lightning.config.schema import ExperimentConfig
    from medseg_lightning.inference.bundle import build_network, save_bundle

    config = ExperimentConfig(name="slices", model={"encoder": "test_resnet"},
                              data={"source": slice_cohort, "labels": {0: "background", 1: "abnormality"},
                                    "label_mapping": {255: 1}, "preprocessing": {"target_size": [32, 32]}})
    network = build_network(config, 3)
    with torch.no_grad():
        network.head.weight.zero_()
        network.head.bias[:] = torch.tensor([0.0, 5.0])  # predicts foreground everywhere
    folder = save_bundle(network, config, 3, tmp_path / "model")
    case = slice_cohort / "TCGA_AA_0001_20000101"
    assert main(["predict", "--model", str(folder), str(case), "--out", str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(f"{case.name}_{n}_pred.png" for n in range(1, 12))
    mask = np.asarray(Image.open(tmp_path / "out" / f"{case.name}_10_pred.png"))
    assert mask.shape == (8, 8) and set(np.unique(mask)) == {255}


@pytest.mark.parametrize(("mode", "border"), [("resize", 255), ("pad_crop", 0)])
def test_a_model_trained_on_the_small_copy_runs_on_full_resolution_slices(tmp_path: Path, mode: str,
                                                                          border: int) -> None:
    """LGG's 128x128 copy was downsampled 2x from the 256x256 original: with ``resize_mode: resize`` a model
    trained on the copy segments the whole original slice (resized to its size and back), not a cropped centre."""
    import torch
    from PIL import Image

    from medseg_lightning.config.schema import ExperimentConfig
    from medseg_lightning.inference.bundle import build_network, save_bundle

    case = "TCGA_EE_0005_20000505"
    folder = tmp_path / "original" / case
    folder.mkdir(parents=True)
    for number in (1, 2):
        tifffile.imwrite(folder / f"{case}_{number}.tif", np.full((16, 16, 3), 100 * number, np.uint8))
        tifffile.imwrite(folder / f"{case}_{number}_mask.tif", np.zeros((16, 16), np.uint8))
    config = ExperimentConfig(name="slices", model={"encoder": "test_resnet"},
                              data={"source": tmp_path, "labels": {0: "background", 1: "abnormality"},
                                    "label_mapping": {255: 1},
                                    "preprocessing": {"target_size": [8, 8], "resize_mode": mode}})
    network = build_network(config, 3)
    with torch.no_grad():
        network.head.weight.zero_()
        network.head.bias[:] = torch.tensor([0.0, 5.0])  # foreground wherever the model looks
    model = save_bundle(network, config, 3, tmp_path / "model")
    assert main(["predict", "--model", str(model), str(folder), "--out", str(tmp_path / "out")]) == 0
    mask = np.asarray(Image.open(tmp_path / "out" / f"{case}_1_pred.png"))
    assert mask.shape == (16, 16) and mask[8, 8] == 255
    assert mask[0, 0] == border  # resize: the whole slice was seen; pad_crop: only its centre
