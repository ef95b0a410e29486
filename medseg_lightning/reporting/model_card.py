"""Model cards (Mitchell et al., "Model Cards for Model Reporting", FAT* 2019) built from a run's data.

Every training run and every evaluation writes one card in three forms: JSON (the raw numbers, so tools and tests
can compare them with the logged metrics), Markdown (for repositories) and HTML (the MLflow artifact viewer renders
``.html`` in an iframe but shows ``.md`` as plain text). The card is built from plain data only (config, summary
metrics, fairness report, counts, dataset fingerprint), so this module imports neither MLflow nor torch and the
numbers it prints are exactly those logged. Groups too small to measure never get a number, not even their size:
small groups of patients can be re-identified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.data.manifest import UNKNOWN

SECTIONS: dict[str, str] = {
    "model_details": "Model details",
    "intended_use": "Intended use",
    "factors": "Factors",
    "metrics": "Metrics",
    "evaluation_data": "Evaluation data",
    "training_data": "Training data",
    "quantitative_analyses": "Quantitative analyses",
    "ethical_considerations": "Ethical considerations",
    "caveats_and_recommendations": "Caveats and recommendations",
}
NOT_STATED = "Not stated: fill in `model_card.intended_use` in the experiment file."
_STATS = ("_median", "_std", "_ci_low", "_ci_high")
_FAMILY_ORDER = ("dice", "iou", "hd95", "assd", "vol_pred", "vol_true", "vol_err")
_PRETRAINED = {"none": "none (random initialisation)", "timm": "timm / Hugging Face ImageNet weights of the encoder"}
_KINDS = {"training": "training run", "evaluation": "evaluation", "cross-validation": "cross-validation (pooled folds)",
          "cross-site": "cross-site generalisation study", "repeats": "repeats over seeds"}
Block = tuple[Any, ...]  # ("p", text) | ("h3", text) | ("ul", items) | ("table", header, rows); text may hold `code`


@dataclass
class CardInputs:
    """Everything a card is built from: plain data, so a card can be rebuilt from a run's logged artifacts.

    ``fairness`` is the report of ``fairness.fairness_report``; ``summary`` holds the aggregate metrics of
    ``evaluation_split`` without the split prefix (``dice/mean``, ``dice/mean_ci_low``, ..., ``n_cases``).
    """

    config: ExperimentConfig
    kind: Literal["training", "evaluation", "cross-validation", "cross-site", "repeats"]
    run_id: str
    created: str
    git_commit: str | None
    git_dirty: bool | None
    package_version: str
    evaluation_split: str
    summary: dict[str, float]
    fairness: dict[str, Any]
    split_counts: dict[str, int]
    group_counts: dict[str, dict[str, dict[str, int | None]]]
    dataset_fingerprint: dict[str, Any]
    dvc_hash: str | None = None
    source_model: str | None = None
    source_run_id: str | None = None
    analyses: dict[str, Any] = field(default_factory=dict)  # ``cross_validation`` and ``cross_site`` results
    study_caveats: list[str] = field(default_factory=list)
    test_looks: dict[str, int] | None = None  # {"evaluations": N, "configurations": M} of this test split


@dataclass(frozen=True)
class _Settings:
    """Audit settings as used by the run (the fairness report), falling back to the config."""

    confidence: float
    n_bootstrap: int
    min_group_size: int
    gap_threshold: float


def build_card(inputs: CardInputs) -> dict[str, Any]:
    """The card as JSON-ready data, sections in Mitchell et al.'s order; NaN (not measurable) becomes null."""
    builders = {"model_details": _model_details, "intended_use": _intended_use, "factors": _factors,
                "metrics": _metrics, "evaluation_data": _evaluation_data, "training_data": _training_data,
                "quantitative_analyses": _quantitative, "ethical_considerations": _ethics,
                "caveats_and_recommendations": _caveats}
    return _clean({key: builders[key](inputs) for key in SECTIONS})


def generated_caveats(inputs: CardInputs) -> list[str]:
    """Caveats that follow from the numbers: unmeasured groups, large gaps, missing attributes, few cases, units."""
    settings = _settings(inputs)
    caveats = [text for audit in inputs.fairness.get("attributes", []) for text in _attribute_caveats(audit, settings)]
    n_cases, minimum = _n_cases(inputs), inputs.config.model_card.min_test_cases
    if n_cases is not None and n_cases < minimum:
        caveats.append(f"Only {fmt_count(n_cases)} evaluation cases ({inputs.evaluation_split} split), fewer than the "
                       f"{minimum} required by `model_card.min_test_cases`: intervals are wide and small differences "
                       "between models or groups are not meaningful.")
    if _pixel_units(inputs):
        caveats.append("Voxel spacing is unknown (e.g. 2D PNG/TIFF images): HD95 and ASSD are in pixels and volumes "
                       "are voxel counts, so they cannot be compared with results in physical units.")
    looks = inputs.test_looks or {}
    if looks.get("configurations", 0) > 1:
        caveats.append(f"This test split has been evaluated {looks['evaluations']} times by {looks['configurations']} "
                       "distinct configurations (every test evaluation is counted in the tracking store). If this "
                       "configuration was chosen among them by its test score, that score is optimistic: choose on "
                       "validation and report the chosen configuration's test score once.")
    caveats += inputs.study_caveats
    if not inputs.config.model_card.intended_use.strip():
        caveats.append("The intended use is not stated: fill in `model_card.intended_use` before sharing this model.")
    return caveats


def _attribute_caveats(audit: dict[str, Any], settings: _Settings) -> list[str]:
    name = audit["attribute"]
    if not audit.get("available", True):
        return [f"{name}: not available for auditing ({audit.get('note') or 'no reason given'})."]
    caveats = []
    small = [group["group"] for group in audit.get("groups", []) if not group.get("measured")]
    if len(small) == 1:
        caveats.append(f"{name}: group '{small[0]}' has fewer than {settings.min_group_size} cases and was not "
                       "measured.")
    elif small:
        listed = ", ".join(f"'{group}'" for group in small)
        caveats.append(f"{name}: groups {listed} have fewer than {settings.min_group_size} cases each and were not "
                       "measured.")
    gap = audit.get("dice_gap") or {}
    if _is_number(gap.get("mean")) and gap["mean"] > settings.gap_threshold:
        low, high = gap.get("ci_low"), gap.get("ci_high")
        excludes = _is_number(low) and _is_number(high) and (low > 0 or high < 0)
        verdict = ("excludes zero, so the gap is unlikely to be chance" if excludes
                   else "includes zero, so the gap may be chance at this number of cases")
        caveats.append(
            f"{name}: mean Dice of group '{audit.get('worst_group')}' ({fmt(audit.get('dice_worst'))}) is "
            f"{fmt(gap['mean'])} below group '{audit.get('best_group')}' ({fmt(audit.get('dice_best'))}), above the "
            f"gap threshold {settings.gap_threshold:g}; the {fmt_percent(settings.confidence)} CI of the gap "
            f"[{fmt(low)}, {fmt(high)}] {verdict}.")
    return caveats


def _model_details(inputs: CardInputs) -> dict[str, Any]:
    config, card, data = inputs.config, inputs.config.model_card, inputs.config.data
    pretrained = config.model.pretrained
    return {
        "name": card.model_name or config.name, "version": card.version or inputs.run_id,
        "kind": _KINDS[inputs.kind], "date": inputs.created,
        "description": config.description or None, "architecture": config.model.arch,
        "encoder": config.model.encoder, "pretrained": pretrained,
        "pretrained_source": _PRETRAINED.get(pretrained, f"weights loaded from {pretrained}"),
        "input_channels": list(data.image_columns), "slice_context": data.slicing.context,
        "classes": {str(label): name for label, name in sorted(data.labels.items())},
        "slicing_axis": data.slicing.axis, "target_size": data.preprocessing.target_size,
        "medseg_lightning_version": inputs.package_version, "git_commit": inputs.git_commit,
        "git_dirty": inputs.git_dirty, "license": card.license, "owners": list(card.owners),
        "mlflow_run_id": inputs.run_id, "evaluated_model": inputs.source_model, "source_run_id": inputs.source_run_id,
    }


def _intended_use(inputs: CardInputs) -> dict[str, Any]:
    card = inputs.config.model_card
    stated = bool(card.intended_use.strip())
    return {"primary_uses": card.intended_use.strip() if stated else NOT_STATED, "stated": stated,
            "out_of_scope_uses": list(card.out_of_scope_uses)}


def _factors(inputs: CardInputs) -> dict[str, Any]:
    audits = {audit["attribute"]: audit for audit in inputs.fairness.get("attributes", [])}
    attributes = []
    for name in dict.fromkeys([*inputs.config.fairness.attributes, *audits]):
        audit = audits.get(name, {})  # the report (what was measured) wins over the config where they differ
        attributes.append({"attribute": name, "bins": audit.get("bins", inputs.config.fairness.bins.get(name)),
                           "available": audit.get("available"), "note": audit.get("note")})
    return {"attributes": attributes, "missing_value_group": UNKNOWN,
            "min_group_size": _settings(inputs).min_group_size}


def _metrics(inputs: CardInputs) -> dict[str, Any]:
    settings, pixel = _settings(inputs), _pixel_units(inputs)
    distance, volume = ("pixels", "voxels") if pixel else ("mm", "ml")
    present = {_family(key).split("_")[0] for key in _base_keys(inputs.summary)} | {"ci"}
    if inputs.fairness.get("attributes"):
        present.add("fairness")
    definitions = [{"metric": name, "definition": text} for family, name, text in
                   _definitions(distance, volume, settings) if family in present]
    return {"definitions": definitions, "distance_unit": distance, "volume_unit": volume,
            "confidence": settings.confidence, "n_bootstrap": settings.n_bootstrap,
            "min_group_size": settings.min_group_size, "gap_threshold": settings.gap_threshold,
            "empty_masks": f"Both masks empty: Dice = IoU = 1, HD95 = ASSD = 0 (nothing to find, nothing found). "
                           f"Exactly one empty: Dice = IoU = 0, HD95 = ASSD = the image diagonal (in {distance}), "
                           "a finite worst case that keeps case means defined."}


def _definitions(distance: str, volume: str, s: _Settings) -> list[tuple[str, str, str]]:
    unit = "_px" if distance == "pixels" else ""
    vol = "vox" if distance == "pixels" else "ml"
    return [
        ("dice", "Dice", "2|P∩T| / (|P| + |T|) per case on the re-stacked 3D volume, averaged over cases (not pooled "
                         "over voxels); `dice/mean` is the mean over cases of each case's mean foreground Dice."),
        ("iou", "IoU", "|P∩T| / |P∪T| (Jaccard index) per case, averaged over cases."),
        ("hd95", "HD95", f"Symmetric 95th percentile Hausdorff distance between predicted and true surfaces, in "
                         f"{distance} (`hd95{unit}/...`): the larger of the two directed 95th percentiles."),
        ("assd", "ASSD", f"Average symmetric surface distance, in {distance} (`assd{unit}/...`)."),
        ("vol", "Volume", f"Predicted and true volume per class in {volume} (`vol_pred_{vol}`, `vol_true_{vol}`); "
                          f"volume error `vol_err_{vol}` = predicted − true (positive: over-segmentation)."),
        ("ci", "Confidence interval", f"Percentile bootstrap of the mean over cases: {s.n_bootstrap} resamples, "
                                      f"{fmt_percent(s.confidence)} level."),
        ("fairness", "Fairness gap", "Best group's mean Dice − worst group's mean Dice; its CI bootstraps every group "
                                     "independently with best and worst fixed from the point estimates."),
        ("fairness", "Fairness ratio", "Worst group's mean Dice / best group's mean Dice (1 = parity)."),
        ("fairness", "Minimum group size", f"Groups with fewer than {s.min_group_size} cases are too small to "
                                           f"measure; a gap above {s.gap_threshold:g} becomes a caveat."),
        ("instance", "Panoptic quality", "`instance/pq`: predicted and true objects matched one to one (same class, "
                                         "IoU > 0.5); sum of matched IoUs / (TP + FP/2 + FN/2), per case; "
                                         "`instance/sq` is the mean IoU of the matches, `instance/rq` their F1."),
        ("instance", "Object count error", "`instance/count_error`: objects found − true objects per case "
                                           "(negative: merged or missed objects); `abs_count_error` its size."),
        ("instance", "Mask AP", "`instance/ap`: mask average precision over the split's objects at IoU 0.50:0.95 "
                                "(COCO), `ap50`/`ap75` at one threshold; Dice and HD95 are those of the merged mask."),
    ]


def _evaluation_data(inputs: CardInputs) -> dict[str, Any]:
    return {"split": inputs.evaluation_split, "n_cases": _n_cases(inputs),
            "group_counts": inputs.group_counts.get(inputs.evaluation_split, {}),
            "min_group_size": _settings(inputs).min_group_size,
            "dataset_fingerprint": inputs.dataset_fingerprint.get("fingerprint"), "dvc_hash": inputs.dvc_hash,
            "test_looks": inputs.test_looks}


def _training_data(inputs: CardInputs) -> dict[str, Any]:
    source, fingerprint = Path(inputs.config.data.source), inputs.dataset_fingerprint
    shown = f"{source.parent.name}/{source.name}" if source.suffix else source.name  # no home folders in cards
    return {"source": shown, "split_counts": dict(inputs.split_counts),
            "dataset_fingerprint": fingerprint.get("fingerprint"), "dvc_hash": inputs.dvc_hash,
            "n_cases": fingerprint.get("n_cases"), "n_subjects": fingerprint.get("n_subjects"),
            "spacing_known": fingerprint.get("spacing_known"), "labels": fingerprint.get("labels"),
            "group_counts": inputs.group_counts.get("train", {}), "min_group_size": _settings(inputs).min_group_size}


def _quantitative(inputs: CardInputs) -> dict[str, Any]:
    summary, settings = inputs.summary, _settings(inputs)
    keys = sorted((key for key in _base_keys(summary)
                   if not _is_ranking_figure(key) and not key.startswith("calibration/")),
                  key=lambda key: (_family_rank(key), not key.endswith("/mean")))
    distance, volume = ("pixels", "voxels") if _pixel_units(inputs) else ("mm", "ml")
    units = {"hd95": distance, "assd": distance, "vol": volume}
    overall = [{"metric": key, "unit": units.get(_family(key).removesuffix("_px"), ""), "mean": summary[key],
                **{stat[1:]: summary.get(key + stat) for stat in _STATS}} for key in keys]
    by_attribute = []
    for audit in inputs.fairness.get("attributes", []):
        groups = [group if group.get("measured") else {"group": group["group"], "n": None, "measured": False}
                  for group in audit.get("groups", [])]
        gap = (audit.get("dice_gap") or {}).get("mean")
        by_attribute.append({**audit, "groups": groups,
                             "gap_exceeds_threshold": _is_number(gap) and gap > settings.gap_threshold})
    return {"split": inputs.evaluation_split, "n_cases": _n_cases(inputs), "confidence": settings.confidence,
            "min_group_size": settings.min_group_size, "distance_unit": distance, "overall": overall,
            "by_attribute": by_attribute, "uncertainty_ranking": _uncertainty_ranking(summary),
            "calibration": _calibration(summary, inputs.config.inference.temperature), **inputs.analyses}


def _calibration(summary: dict[str, float], temperature: float | None = None) -> dict[str, Any] | None:
    """The split's expected calibration error, and per audited group (``evaluation/calibration.py``), with the
    softmax temperature the model applies (``medseg calibrate``)."""
    if summary.get("calibration/ece") is None:
        return None
    groups = [{"attribute": key.split("/")[1], "group": key.split("/")[2], "ece": value}
              for key, value in summary.items() if key.startswith("calibration/") and key.count("/") == 3]
    gaps = {key.split("/")[1]: value for key, value in summary.items()
            if key.startswith("calibration/") and key.endswith("/ece_gap")}
    return {"ece": summary["calibration/ece"], "groups": groups, "gaps": gaps, "temperature": temperature}


_RANKING_FIGURES = ("spearman", "aurc", "aurc_oracle", "aurc_random", "n")


def _is_ranking_figure(key: str) -> bool:
    """``uncertainty/<score>/spearman`` and its siblings: figures about a score, not means over cases."""
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == "uncertainty" and parts[2] in _RANKING_FIGURES


def _uncertainty_ranking(summary: dict[str, float]) -> list[dict[str, Any]]:
    """Per uncertainty score, how well it ranks the cases by their Dice (``evaluation/uncertainty_ranking.py``)."""
    scores = sorted({key.split("/")[1] for key in summary if _is_ranking_figure(key)})
    return [{"score": score, **{figure: summary.get(f"uncertainty/{score}/{figure}") for figure in _RANKING_FIGURES}}
            for score in scores if summary.get(f"uncertainty/{score}/spearman") is not None]


def _ethics(inputs: CardInputs) -> dict[str, Any]:
    minimum = _settings(inputs).min_group_size
    return {"stated": list(inputs.config.model_card.ethical_considerations), "standard": [
        "The model was trained and evaluated on medical images of patients; its output is not a diagnosis and "
        "must be reviewed by a qualified clinician before any clinical use.",
        "No patient identifiers are logged with the run or printed in this card, which reports aggregate numbers.",
        f"Groups with fewer than {minimum} cases are not disclosed (neither their metrics nor their size), to limit "
        "the risk of re-identifying patients."]}


def _caveats(inputs: CardInputs) -> dict[str, Any]:
    card = inputs.config.model_card
    return {"generated": generated_caveats(inputs), "stated": list(card.caveats),
            "recommendations": list(card.recommendations)}


def _settings(inputs: CardInputs) -> _Settings:
    report, config = inputs.fairness, inputs.config.fairness
    return _Settings(*(report.get(name, getattr(config, name))
                       for name in ("confidence", "n_bootstrap", "min_group_size", "gap_threshold")))


def _base_keys(summary: dict[str, float]) -> list[str]:
    """Metric keys without their statistics suffix (``dice/mean``, not ``dice/mean_ci_low``)."""
    return [key for key in summary if "/" in key
            and not any(key.endswith(stat) and key.removesuffix(stat) in summary for stat in _STATS)]


def _family(key: str) -> str:
    """``hd95_px/mean`` -> ``hd95_px``; ``vol_err_ml/anterior`` -> ``vol``."""
    head = key.split("/")[0]
    return "vol" if head.startswith("vol_") else head


def _family_rank(key: str) -> int:
    head = key.split("/")[0]
    return next((rank for rank, name in enumerate(_FAMILY_ORDER) if head.startswith(name)), len(_FAMILY_ORDER))


def _pixel_units(inputs: CardInputs) -> bool:
    """Distances in pixels: the summary says so with ``_px``/``_vox`` keys, else the fingerprint's spacing flag."""
    keys = list(inputs.summary)
    if any("_px/" in key or "_vox/" in key for key in keys):
        return True
    if any(key.split("/")[0] in ("hd95", "assd") or "_ml/" in key for key in keys):
        return False
    return inputs.dataset_fingerprint.get("spacing_known") is False


def _n_cases(inputs: CardInputs) -> float | None:
    value = inputs.summary.get("n_cases")
    return value if _is_number(value) else inputs.split_counts.get(inputs.evaluation_split)


def _clean(value: Any) -> Any:
    """JSON-ready copy: string keys, lists for tuples, null for NaN/inf (strict JSON), plain Python numbers."""
    if isinstance(value, dict):
        return {str(key): _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalars
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "n/a"


def fmt_estimate(estimate: dict[str, Any] | None) -> str:
    if not estimate:
        return "n/a"
    return f"{fmt(estimate.get('mean'))} [{fmt(estimate.get('ci_low'))}, {fmt(estimate.get('ci_high'))}]"


def fmt_count(value: Any) -> str:
    return str(int(value)) if _is_number(value) and float(value).is_integer() else fmt(value)


def fmt_edge(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def fmt_percent(level: float) -> str:
    return f"{round(level * 100, 2):g}%"


