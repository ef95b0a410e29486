"""``medseg crosssite``: how much accuracy a model loses at a site (hospital, scanner) it never saw in training.

For every group of the attribute with at least ``fairness.min_group_size`` cases, one model is trained and
validated on the other groups' cases only (split ``leave_group_out``) and tested on that group. The same cases'
Dice when their group *was* seen in training comes from the pooled cross-validation of the same experiment
(``medseg crossval``, reused when it already ran). The drop is seen − unseen, paired per case, with a bootstrap
interval: a drop whose interval excludes zero says the model should not be trusted at a new site untested.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.data.manifest import UNKNOWN
from medseg_lightning.evaluation.fairness import group_labels
from medseg_lightning.evaluation.statistics import Estimate, interval
from medseg_lightning.reporting.model_card import fmt, fmt_estimate
from medseg_lightning.studies.children import (
    Child,
    Echo,
    Study,
    StudyError,
    child_test_cases,
    log_study,
    open_study,
    run_child,
    study_context,
)
from medseg_lightning.studies.crossval import (
    CrossValResult,
    check_crossval_config,
    fold_summary,
    load_cohort,
    pooled_report,
    run_crossval,
)
from medseg_lightning.utilities.names import metric_name

KIND = "cross-site"
DICE = "dice/mean"
RERUN_WHEN_FINISHED = "rerun this command when it has finished (the held-out models are reused)"


@dataclass
class HeldOutGroup:
    """One held-out group: its cases' Dice seen and unseen in training, and the paired drop."""

    group: str
    n: int
    run_id: str
    dice_in: Estimate
    dice_out: Estimate
    dice_drop: Estimate
    cases: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)


@dataclass
class CrossSiteResult:
    run_id: str
    tracking_uri: str
    attribute: str
    crossval: CrossValResult
    groups: list[HeldOutGroup]
    not_measured: list[dict[str, str]]


def eligible_groups(config: ExperimentConfig, attribute: str) -> tuple[list[str], list[dict[str, str]]]:
    """The groups to hold out (at least ``min_group_size`` cases, not ``unknown``) and the others with the reason.

    Raises:
        ValueError: an attribute that is binned or that no case has, or no group large enough.
    """
    if attribute in config.fairness.bins:
        raise ValueError(f"--attribute {attribute}: binned attributes cannot be held out as groups; use a categorical "
                         "one (site, scanner, sex)")
    cases = load_cohort(config)
    if not any(case.attributes.get(attribute) is not None for case in cases):
        available = sorted({name for case in cases for name, value in case.attributes.items() if value is not None})
        raise ValueError(f"--attribute {attribute}: no case has this attribute; available: {', '.join(available)}")
    sizes = group_labels(pd.Series([case.attributes.get(attribute) for case in cases], dtype=object), None)
    minimum = config.fairness.min_group_size
    eligible, skipped = [], []
    for group, n in sorted(sizes.value_counts().items()):
        if group == UNKNOWN:
            skipped.append({"group": group, "reason": f"cases without a {attribute} are not a {attribute}"})
        elif n < minimum:
            skipped.append({"group": group, "reason": f"fewer than {minimum} cases"})
        else:
            eligible.append(group)
    if not eligible:
        raise ValueError(f"--attribute {attribute}: no group has {minimum} cases (fairness.min_group_size)")
    return eligible, skipped


def run_crosssite(config: ExperimentConfig, attribute: str, root: Path | None = None, echo: Echo = print,
                  seen_from: str | None = None) -> CrossSiteResult:
    """Cross-validation (reused when finished), then one held-out model per eligible group; logs the table.

    Args:
        seen_from: take the "seen in training" Dice from this earlier cross-validation (or cross-site) run instead
            of cross-validating this config: the drop is then measured against that reference, e.g. a remedy's
            unseen-site Dice against the baseline's in-site Dice, for 4 runs instead of 9.
    """
    from medseg_lightning import tracking
    from medseg_lightning.tracking.studies import fold_runs_of

    check_crossval_config(config)  # "seen in training" numbers come from the cross-validation
    groups, skipped = eligible_groups(config, attribute)
    root = root or tracking.project_root(Path.cwd())
    echo(f"cross-{attribute}: holding out {', '.join(groups)}"
         + (f"; not held out: {', '.join(item['group'] for item in skipped)}" if skipped else ""))
    qualifier = f"{attribute}:{seen_from}" if seen_from else attribute
    tags = {"medseg.crosssite.attribute": attribute}
    with open_study(KIND, config, root, qualifier=qualifier, label=attribute, tags=tags) as study:
        if seen_from:
            fold_runs_of(study.client, seen_from)  # a wrong run id fails now, not after hours of training
        else:
            crossval = run_crossval(config, root, parent_run_id=study.run_id, echo=echo)
        # the held-out models do not need the reference, which may still be running elsewhere: pair them last
        held_out = {group: _train_held_out(study, attribute, group, echo) for group in groups}
        if seen_from:
            crossval = reference_crossval(study, seen_from)
        study.client.set_tag(study.run_id, "medseg.crossval_run_id", crossval.run_id)
        results = [_paired(study, crossval, attribute, group, run_id) for group, run_id in held_out.items()]
        _log(study, crossval, attribute, results, skipped)
    return CrossSiteResult(study.run_id, study.client.tracking_uri, attribute, crossval, results, skipped)


def reference_crossval(study: Study, run_id: str) -> CrossValResult:
    """An earlier cross-validation's pooled test rows, as the "seen in training" reference of this study."""
    from medseg_lightning.tracking.studies import fold_runs_of

    folds = fold_runs_of(study.client, run_id)
    if not folds:
        raise StudyError(f"--seen-from {run_id}: the run has no finished fold runs yet; {RERUN_WHEN_FINISHED}")
    crossval_run = study.client.get_run(next(iter(folds.values()))).data.tags["mlflow.parentRunId"]
    try:
        report = pooled_report(study, folds)
    except StudyError as error:  # a fold not finished (yet) leaves cases untested
        raise StudyError(f"--seen-from {run_id}: {error} ({len(folds)} fold(s) finished); if it is still running, "
                         f"{RERUN_WHEN_FINISHED}") from None
    return CrossValResult(crossval_run, study.client.tracking_uri, folds, report)


def _train_held_out(study: Study, attribute: str, group: str, echo: Echo) -> str:
    """The run id of the model trained and validated without ``group``'s cases and tested on them."""
    overrides = {"data.split.method": "leave_group_out", "data.split.group_attribute": attribute,
                 "data.split.held_out_group": group}
    return run_child(study, Child(f"{metric_name(attribute)}-{metric_name(group)}", overrides), echo)


def _paired(study: Study, crossval: CrossValResult, attribute: str, group: str, run_id: str) -> HeldOutGroup:
    unseen = child_test_cases(study, run_id)[["case_id", DICE]].rename(columns={DICE: "dice_out"})
    seen = pd.DataFrame([{"case_id": row["case_id"], "dice_in": row.get(DICE)} for row in crossval.report.cases])
    paired = unseen.merge(seen, on="case_id", how="left")
    if paired["dice_in"].isna().any():
        raise StudyError(f"{attribute} {group}: {int(paired['dice_in'].isna().sum())} held-out case(s) have no "
                         f"result in cross-validation {crossval.run_id} ({len(crossval.fold_runs)} fold(s) finished); "
                         f"if it is still running, {RERUN_WHEN_FINISHED}")
    return paired_estimates(group, run_id, paired, study.config)


def paired_estimates(group: str, run_id: str, paired: pd.DataFrame, config: ExperimentConfig) -> HeldOutGroup:
    """Means with bootstrap intervals of seen, unseen and their per-case difference (same cases, so paired)."""
    fairness = config.fairness
    digest = int(hashlib.sha256(group.encode()).hexdigest()[:8], 16)  # a fixed, distinct stream per group
    rng = np.random.default_rng([fairness.seed, digest])
    seen, unseen = paired["dice_in"].to_numpy(float), paired["dice_out"].to_numpy(float)
    estimates = [interval(values, fairness.n_bootstrap, fairness.confidence, rng)
                 for values in (seen, unseen, seen - unseen)]
    return HeldOutGroup(group, len(paired), run_id, *estimates, cases=paired.assign(group=group))


def metrics(attribute: str, groups: list[HeldOutGroup]) -> dict[str, float]:
    """``crosssite/<attribute>/<group>/dice_in``, ``.../dice_out``, ``.../dice_drop`` (each with ``_ci_low`` and
    ``_ci_high``) and ``.../n``; ``crosssite/<attribute>/dice_drop_mean`` averages the groups' drops."""
    out: dict[str, float] = {}
    prefix = f"crosssite/{metric_name(attribute)}"
    for item in groups:
        name = f"{prefix}/{metric_name(item.group)}"
        for key in ("dice_in", "dice_out", "dice_drop"):
            estimate: Estimate = getattr(item, key)
            out |= {f"{name}/{key}": estimate.mean, f"{name}/{key}_ci_low": estimate.ci_low,
                    f"{name}/{key}_ci_high": estimate.ci_high}
        out[f"{name}/n"] = float(item.n)
    out[f"{prefix}/dice_drop_mean"] = float(np.mean([item.dice_drop.mean for item in groups]))
    return out


def card_section(attribute: str, groups: list[HeldOutGroup], skipped: list[dict[str, str]],
                 confidence: float) -> dict[str, Any]:
    rows = [{"group": g.group, "n": g.n, "run_id": g.run_id, "dice_in": asdict(g.dice_in),
             "dice_out": asdict(g.dice_out), "dice_drop": asdict(g.dice_drop)} for g in groups]
    return {"attribute": attribute, "confidence": confidence, "groups": rows, "not_measured": skipped}


def caveats(attribute: str, groups: list[HeldOutGroup], skipped: list[dict[str, str]]) -> list[str]:
    """A caveat for every group whose drop interval excludes zero, and for every group not held out."""
    notes = [f"{attribute} {g.group}: mean Dice drops by {fmt_estimate(asdict(g.dice_drop))} when no {g.group} case "
             f"is in training ({fmt(g.dice_in.mean)} seen, {fmt(g.dice_out.mean)} unseen); the interval excludes zero: "
             f"expect lower accuracy at a {attribute} the model was not trained on, and validate it there first."
             for g in groups if g.dice_drop.ci_low > 0]
    notes += [f"{attribute} {item['group']}: generalisation to it was not measured ({item['reason']})."
              for item in skipped if item["group"] != UNKNOWN]
    return notes


def _log(study: Study, crossval: CrossValResult, attribute: str, groups: list[HeldOutGroup],
         skipped: list[dict[str, str]]) -> None:
    from medseg_lightning.reporting.plots import save_crosssite_plot
    from medseg_lightning.tracking import log_report

    confidence = study.config.fairness.confidence
    section = card_section(attribute, groups, skipped, confidence)
    analyses = {"cross_validation": fold_summary(crossval.report, crossval.fold_runs, study.config),
                "cross_site": section}
    context = study_context(study, crossval.report, crossval.fold_runs[0], analyses,
                            caveats(attribute, groups, skipped), kind=KIND)
    log_study(study, context, {"test": crossval.report}, crossval.report.metrics() | metrics(attribute, groups))
    name = metric_name(attribute)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        table = pd.DataFrame([{"group": g.group, "n": g.n, **_flat("dice_in", g.dice_in),
                               **_flat("dice_out", g.dice_out), **_flat("dice_drop", g.dice_drop), "run_id": g.run_id}
                              for g in groups])
        files = [folder / f"crosssite_{name}.csv", folder / f"crosssite_{name}_cases.csv"]
        table.to_csv(files[0], index=False)
        pd.concat([g.cases for g in groups], ignore_index=True).to_csv(files[1], index=False)
        files.append(save_crosssite_plot(section["groups"], attribute, folder / f"crosssite_{name}.png", confidence))
        log_report(study.client, study.run_id, files, "crosssite", {})


def _flat(key: str, estimate: Estimate) -> dict[str, float]:
    return {key: estimate.mean, f"{key}_ci_low": estimate.ci_low, f"{key}_ci_high": estimate.ci_high}
