"""Instance segmentation pieces: objects from label maps, the touching-objects cohort, PQ/AP, detections to
objects, Mask R-CNN targets and model; the end-to-end training run is in test_mask_rcnn.py."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medseg_lightning.cli import main
from medseg_lightning.config import ConfigError, load_config
from medseg_lightning.data.instances import box_sides, components, drop_small, object_classes
from medseg_lightning.data.synth_instances import generate_instance_cohort, touching_pairs
from medseg_lightning.evaluation.instance_metrics import MaskAP, Objects, panoptic
from medseg_lightning.inference.detections import link_slices, objects_from_detections, paint_slices
from medseg_lightning.models.mask_rcnn import anchor_sizes_for, create_mask_rcnn
from medseg_lightning.training.instance_module import slice_targets


def test_components_drop_small_and_majority_classes() -> None:
    labels = np.zeros((6, 6, 1), np.uint8)
    labels[0:2, 0:2] = 1
    labels[2, 2] = 1  # touches the first block diagonally only
    labels[4:6, 4:6] = 2
    faces = components(labels, 1)
    assert faces.max() == 3  # the diagonal voxel is its own object with face connectivity
    assert components(labels, 3).max() == 2  # and joins the block with corner connectivity
    assert drop_small(faces, 2).max() == 2  # the single voxel is not an object at min_size 2
    ids = drop_small(faces, 2)
    assert object_classes(ids, labels).tolist() == [0, 1, 2]
    mixed = np.array([[1, 1, 1, 0]])
    assert object_classes(mixed, np.array([[2, 2, 1, 0]])).tolist() == [0, 2]  # the majority label under it


def test_the_touching_cohort_is_deterministic_and_defeats_connected_components(tmp_path: Path) -> None:
    first = generate_instance_cohort(tmp_path / "a", 6, seed=4, shape=(48, 48, 4))
    second = generate_instance_cohort(tmp_path / "b", 6, seed=4, shape=(48, 48, 4))
    assert first.read_text() == second.read_text()
    merged = 0
    for case in range(6):
        name = f"synth_{case:03d}.nii.gz"
        ids = np.asarray(nib.load(tmp_path / "a" / "instancesTr" / name).dataobj)
        assert np.array_equal(ids, np.asarray(nib.load(tmp_path / "b" / "instancesTr" / name).dataobj))
        semantic = np.asarray(nib.load(tmp_path / "a" / "labelsTr" / name).dataobj)
        assert np.array_equal(semantic, ids > 0)
        merged += int(ids.max()) - int(components(semantic, 1).max())
        assert touching_pairs(ids) >= 0
    assert merged > 0  # connected components of the label map lose objects that touch


def _objects(ids: np.ndarray, classes: list[int], scores: list[float] | None = None) -> Objects:
    return Objects(ids, np.asarray([0, *classes]), None if scores is None else np.asarray([0.0, *scores]))


def test_panoptic_quality_known_answers() -> None:
    true = np.zeros((10, 10, 1), np.int32)
    true[0:4, 0:4] = 1
    true[6:10, 6:10] = 2
    perfect = panoptic(_objects(true, [1, 1]), _objects(true, [1, 1]))
    assert perfect["pq"] == 1 and perfect["count_error"] == 0
    merged = true.copy()
    merged[merged == 2] = 0  # the second object missed: one TP (IoU 1), one FN
    result = panoptic(_objects(merged, [1]), _objects(true, [1, 1]))
    assert result["pq"] == pytest.approx(1 / 1.5) and result["rq"] == pytest.approx(1 / 1.5)
    assert result["count_error"] == -1 and result["abs_count_error"] == 1
    wrong_class = panoptic(_objects(true, [1, 2]), _objects(true, [1, 1]))
    assert wrong_class["pq"] == pytest.approx(1 / 2)  # TP 1, FP 1, FN 1
    empty = np.zeros_like(true)
    assert panoptic(_objects(empty, []), _objects(empty, []))["pq"] == 1  # nothing to find, nothing found


def test_mask_ap_perfect_missing_and_undefined() -> None:
    true = np.zeros((8, 8, 2), np.int32)
    true[1:4, 1:4] = 1
    true[5:8, 5:8, 1] = 2
    perfect = MaskAP()
    perfect.update(_objects(true, [1, 1], [0.9, 0.8]), _objects(true, [1, 1]))
    assert perfect.compute() == {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0), "ap75": pytest.approx(1.0)}
    missing = MaskAP()
    missing.update(_objects(np.zeros_like(true), []), _objects(true, [1, 1]))
    assert missing.compute()["ap"] == 0.0
    undefined = MaskAP()
    undefined.update(_objects(np.zeros_like(true), []), _objects(np.zeros_like(true), []))
    assert undefined.compute() == {}


def _detection(masks: list[np.ndarray], scores: list[float], labels: list[int]) -> dict[str, np.ndarray]:
    return {"masks": np.stack(masks)[:, None].astype(np.float32) if masks else np.zeros((0, 1, 6, 6), np.float32),
            "scores": np.asarray(scores, np.float32), "labels": np.asarray(labels)}


def test_detections_become_objects_painted_by_score_and_linked_across_slices() -> None:
    left, right, overlap = (np.zeros((6, 6)) for _ in range(3))
    left[0:3, 0:3] = 1
    right[0:3, 2:5] = 1
    overlap[1:3, 1:3] = 1
    slices = [_detection([left, right], [0.6, 0.9], [1, 1]),  # right wins the shared column
              _detection([overlap], [0.8], [1]),  # continues the left object on the next slice
              _detection([right], [0.3], [1])]  # below the threshold: dropped
    painted = paint_slices(slices, (6, 6), 0.5)
    assert painted.count == 3 and painted.ids[0][0, 2] == 1 and painted.classes[1] == 1
    assert painted.scores[1] == pytest.approx(0.9)
    linked = link_slices(painted)
    assert linked.count == 2  # the slice-1 detection joined an object of slice 0
    assert linked.ids[1][1, 1] == linked.ids[0][1, 1]
    other_class = [_detection([left], [0.9], [1]), _detection([left], [0.9], [2])]
    assert objects_from_detections(other_class, (6, 6), 0.5).count == 2  # classes never merge


def test_a_detection_mostly_covered_by_a_more_confident_one_is_a_duplicate() -> None:
    right, duplicate, neighbour = (np.zeros((6, 6)) for _ in range(3))
    right[0:3, 2:5] = 1
    duplicate[0:3, 1:4] = 1  # two thirds under `right`: only a one-pixel-wide sliver would be left
    neighbour[0:3, 0:3] = 1  # one third under `right`: a touching object of its own
    painted = paint_slices([_detection([right, duplicate], [0.9, 0.8], [1, 1])], (6, 6), 0.5)
    assert painted.count == 1 and set(np.unique(painted.ids)) == {0, 1}
    painted = paint_slices([_detection([right, neighbour], [0.9, 0.8], [1, 1])], (6, 6), 0.5)
    assert painted.count == 2 and (painted.ids[0] == 2).sum() == 6


def test_slice_targets_have_boxes_covering_each_object_and_majority_classes() -> None:
    instances = torch.zeros(8, 8, dtype=torch.long)
    instances[2, 3] = 5  # a one-pixel object
    instances[4:7, 1:3] = 2
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[instances > 0] = 1
    mask[4, 1] = 2  # a minority voxel of class 2 under object 2
    target = slice_targets(instances, mask)
    assert target["boxes"].tolist() == [[1.0, 4.0, 3.0, 7.0], [3.0, 2.0, 4.0, 3.0]]  # x1, y1, x2, y2 pixel edges
    assert target["labels"].tolist() == [1, 1] and target["masks"].shape == (2, 8, 8)
    empty = slice_targets(torch.zeros(8, 8, dtype=torch.long), torch.zeros(8, 8, dtype=torch.long))
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_mask_rcnn_on_a_timm_encoder_trains_and_detects() -> None:
    torch.manual_seed(0)
    model = create_mask_rcnn("test_resnet", 2, 3, (32, 32), anchor_sizes_for([4, 6, 10, 20], (32, 32)))
    instances = torch.zeros(2, 32, 32, dtype=torch.long)
    instances[0, 4:12, 4:14] = 1
    instances[1, 16:30, 10:20] = 1
    targets = [slice_targets(i, (i > 0).long()) for i in instances]
    losses = model(torch.randn(2, 2, 32, 32), targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    sum(losses.values()).backward()
    first = next(p for p in model.encoder.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0  # the timm encoder learns through the pyramid
    model.eval()
    with torch.no_grad():
        outputs = model(torch.randn(3, 2, 32, 32))
    assert len(outputs) == 3 and all(o["masks"].shape[1:] == (1, 32, 32) for o in outputs)
    with pytest.raises(ValueError, match="5 levels, one anchor size each"):
        create_mask_rcnn("test_resnet", 1, 2, (32, 32), [8, 16])


def test_the_heads_follow_the_pyramid_width_and_match_torchvision_at_256() -> None:
    from torchvision.models.detection import MaskRCNN

    wide = create_mask_rcnn("test_resnet", 1, 2, (32, 32), [4, 6, 8, 12, 16], fpn_channels=256)
    reference = MaskRCNN(wide.detector.backbone, num_classes=2)  # torchvision's own heads on the same pyramid
    assert [p.shape for p in wide.detector.roi_heads.parameters()] == [
        p.shape for p in reference.roi_heads.parameters()]
    narrow = create_mask_rcnn("test_resnet", 1, 2, (32, 32), [4, 6, 8, 12, 16], fpn_channels=32)
    heads = narrow.detector.roi_heads
    assert heads.mask_head[0][0].in_channels == 32 and heads.mask_head[-1][0].out_channels == 32
    assert heads.box_head.fc6.in_features == 32 * 7 * 7 and heads.box_predictor.cls_score.out_features == 2


def test_anchor_sizes_span_the_training_objects() -> None:
    sizes = anchor_sizes_for([6.0] * 5 + [10.0] * 90 + [40.0] * 5, (128, 128))
    assert len(sizes) == 5 and sizes == sorted(set(sizes))
    assert sizes[0] <= 6 and sizes[-1] >= 40  # from the small objects up to the largest
    planes = np.zeros((1, 2, 16, 16), np.uint16)
    planes[0, 0, 2:6, 2:11] = 1  # a 4 x 9 box
    assert box_sides([planes[0]]) == [6.0]


def test_instance_configs_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "task": "instance", "data": {"source": "d"}}))
    with pytest.raises(ConfigError, match="instance segmentation uses arch mask_rcnn"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"needs data\.preprocessing\.target_size"):
        load_config(path, ["model.arch=mask_rcnn"])
    config = load_config(path, ["model.arch=mask_rcnn", "data.preprocessing.target_size=[32,32]"])
    assert config.data.instances is not None and config.data.instances.source == "components"
    semantic = tmp_path / "semantic.yaml"
    semantic.write_text(yaml.safe_dump({"name": "x", "data": {"source": "d"}, "model": {"arch": "mask_rcnn"}}))
    with pytest.raises(ConfigError, match=r"task 'semantic' with model\.arch 'mask_rcnn'"):
        load_config(semantic)
    with pytest.raises(ConfigError, match="semantic runs log no instance metrics"):
        load_config(semantic, ["model.arch=unet", "trainer.monitor=val/instance/pq"])


def test_data_check_names_bad_instance_maps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cohort = tmp_path / "cohort"
    generate_instance_cohort(cohort, 4, seed=0, shape=(32, 32, 3))
    ids = nib.load(cohort / "instancesTr" / "synth_001.nii.gz")
    cut = nib.Nifti1Image(np.asarray(ids.dataobj)[:, :, :2], ids.affine)
    nib.save(cut, cohort / "instancesTr" / "synth_001.nii.gz")
    on_background = np.asarray(nib.load(cohort / "instancesTr" / "synth_002.nii.gz").dataobj).copy()
    on_background[0, 0, 0] = 99
    nib.save(nib.Nifti1Image(on_background, ids.affine), cohort / "instancesTr" / "synth_002.nii.gz")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "x", "task": "instance", "model": {"arch": "mask_rcnn"},
        "data": {"source": str(cohort), "labels": {0: "background", 1: "cell"},
                 "instances": {"source": "column", "column": "instances"},
                 "preprocessing": {"target_size": [32, 32]}, "split": {"n_folds": 2}}}))
    assert main(["data", "check", str(experiment)]) == 1
    out = capsys.readouterr().out
    assert "case synth_001: " in out and "instance map shape (32, 32, 2) != mask shape (32, 32, 3)" in out
    assert "case synth_002: " in out and "object(s) [" in out and "lie on background" in out
    assert "2 valid case(s)" in out


def test_connected_components_of_a_perfect_label_map_merge_touching_objects(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason for Mask R-CNN: even a perfect semantic map loses the objects that touch."""
    from medseg_lightning.config.tasks import task_of
    from medseg_lightning.data.datamodule import SegmentationDataModule
    from medseg_lightning.data.dataset import CaseDataset
    from medseg_lightning.evaluation import instance_scoring

    generate_instance_cohort(tmp_path / "cohort", 6, seed=5, shape=(48, 48, 4))
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "x", "data": {"source": str(tmp_path / "cohort"), "labels": {0: "background", 1: "cell"},
                              "instances": {"source": "column", "column": "instances"},
                              "preprocessing": {"target_size": [48, 48]}, "split": {"n_folds": 2}},
        "fairness": {"n_bootstrap": 100}}))
    config = load_config(experiment)
    datamodule = SegmentationDataModule(config.data, cache_dir=tmp_path / "cache")
    datamodule.setup()
    items = list(CaseDataset(datamodule.dataset.cases))
    truth = iter([item["mask"].numpy().astype(np.uint8) for item in items])
    monkeypatch.setattr(instance_scoring, "predict_labels", lambda *args: next(truth))  # the true label map
    report = task_of(config).evaluate(torch.nn.Identity(), items, "test", config)  # semantic model, instance data
    assert report.summary["dice/mean"] == 1.0
    assert report.summary["instance/count_error"] < 0  # objects that touch came out as one
    assert report.summary["instance/pq"] < 0.9 and report.summary["instance/ap"] < 0.9


def test_transfer_weights_load_into_the_mask_rcnn_encoder(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from medseg_lightning.models import create_model
    from medseg_lightning.training.transfer import load_pretrained

    torch.manual_seed(1)
    semantic = create_model("unet", "test_resnet", 1, 2)  # e.g. a U-Net trained earlier on the same scans
    weights = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in semantic.state_dict().items()}, str(weights))
    torch.manual_seed(2)
    detector = create_mask_rcnn("test_resnet", 1, 2, (32, 32), [4, 6, 8, 12, 16])
    report = load_pretrained(detector, str(weights), tmp_path)
    assert report is not None and "pretrained encoder weights" in report
    loaded = detector.encoder.state_dict()
    assert loaded and all(torch.equal(loaded[k], v) for k, v in semantic.encoder.state_dict().items())
