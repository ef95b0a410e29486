"""End-to-end on the real MSD Hippocampus data (needs MEDSEG_DATA_ROOT; slow, run by CI with -m slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg_lightning.cli import main
from medseg_lightning.config import load_config
from medseg_lightning.data.datamodule import SegmentationDataModule

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_prepare_and_iterate_hippocampus(data_root: Path, tmp_path: Path) -> None:
    experiment = REPO / "experiments" / "hippocampus_unet.yaml"
    fingerprint_path = tmp_path / "fingerprint.json"
    assert main(["data", "prepare", str(experiment), "--out", str(fingerprint_path)]) == 0
    fingerprint = json.loads(fingerprint_path.read_text())
    assert fingerprint["n_cases"] == 200 and fingerprint["n_channels"] == 1
    assert fingerprint["spacing_mm"]["median"] == [1.0, 1.0, 1.0]
    assert fingerprint["labels"]["anterior"]["cases"] == 200 and fingerprint["labels"]["posterior"]["cases"] == 200

    config = load_config(experiment, ["data.loader.num_workers=0", "data.slicing.context=1"])
    module = SegmentationDataModule(config.data, seed=config.seed)
    module.setup("fit")
    loader = module.train_dataloader()
    seen = 0
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 64, 64)
        assert int(batch["mask"].max()) <= 2
        seen += len(batch["image"])
    assert seen == len(loader.sampler)
    val_cases = [item for batch in module.val_dataloader() for item in batch]
    assert len(val_cases) == 32  # the inner validation split: 20% of the 160 non-test subjects
    assert all(item["image"].shape[0] == item["meta"]["shape"][3] for item in val_cases)  # all slices of a case
