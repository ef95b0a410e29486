"""Instance metrics per case (3D): panoptic quality, object counts; mask AP over a split.

Objects are matched one to one when they have the same class and an IoU above 0.5 (then the match is unique,
Kirillov et al. 2019). Panoptic quality = sum of matched IoUs / (TP + FP/2 + FN/2): segmentation quality times
recognition quality (an F1 score of the objects). Mask AP averages precision over IoU thresholds 0.50:0.95 as
COCO does, through torchmetrics (pycocotools backend); a 3D case is one "image" whose masks are its volumes
flattened to 2D, which leaves every IoU unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from medseg_lightning.data.instances import Objects, iou_matrix

MATCH_IOU = 0.5


def panoptic(pred: Objects, true: Objects) -> dict[str, float]:
    """``pq``, ``sq`` (mean IoU of matches), ``rq`` (object F1), object counts and the count error."""
    n_pred, n_true = pred.count, true.count
    iou = iou_matrix(pred.ids, true.ids, n_pred, n_true)
    same_class = pred.classes[1:, None] == true.classes[None, 1:]
    matched = (iou > MATCH_IOU) & same_class
    tp = int(matched.sum())
    fp, fn = n_pred - tp, n_true - tp
    if n_pred == 0 and n_true == 0:
        pq = sq = rq = 1.0  # nothing to find, nothing found
    else:
        sq = float(iou[matched].mean()) if tp else 0.0
        rq = tp / (tp + fp / 2 + fn / 2)
        pq = sq * rq
    return {"pq": pq, "sq": sq, "rq": rq, "n_true": float(n_true), "n_pred": float(n_pred),
            "count_error": float(n_pred - n_true), "abs_count_error": float(abs(n_pred - n_true))}


class MaskAP:
    """Mask AP (0.50:0.95), AP50 and AP75 over the cases of a split, accumulated case by case."""

    def __init__(self) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        self.metric = MeanAveragePrecision(iou_type="segm")
        self.cases = 0
        self.true_objects = 0

    def update(self, pred: Objects, true: Objects) -> None:
        self.metric.update([_targets(pred, with_scores=True)], [_targets(true, with_scores=False)])
        self.cases += 1
        self.true_objects += true.count

    def compute(self) -> dict[str, float]:
        """Empty when no case has a true object (AP is undefined); 0 when objects exist but none was found
        (torchmetrics reports -1 then)."""
        if not self.true_objects:
            return {}
        result = self.metric.compute()
        return {name: max(0.0, float(result[key])) for name, key in
                (("ap", "map"), ("ap50", "map_50"), ("ap75", "map_75"))}


def _targets(objects: Objects, with_scores: bool) -> dict[str, torch.Tensor]:
    flat = objects.ids.reshape(objects.ids.shape[0], -1)
    ids = np.arange(1, objects.count + 1)
    masks = torch.from_numpy(flat[None] == ids[:, None, None]) if len(ids) else torch.zeros((0, *flat.shape),
                                                                                            dtype=torch.bool)
    out = {"masks": masks, "labels": torch.from_numpy(objects.classes[1:].astype(np.int64))}
    if with_scores:
        scores = objects.scores[1:] if objects.scores is not None else np.ones(objects.count)
        out["scores"] = torch.from_numpy(np.asarray(scores, dtype=np.float32))
    return out
