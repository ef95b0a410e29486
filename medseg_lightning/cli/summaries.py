"""What the commands print when they finish: one screen per run, evaluation or study, the headline numbers first."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medseg_lightning.evaluation.scoring import EvaluationReport
    from medseg_lightning.studies.crosssite import CrossSiteResult
    from medseg_lightning.studies.crossval import CrossValResult
    from medseg_lightning.studies.repeats import RepeatsResult
    from medseg_lightning.training.train import RunResult

STATISTICS = ("_median", "_std", "_ci_low", "_ci_high")


def format_summary(result: RunResult) -> str:
    """The one-screen summary printed after training."""
    minutes, seconds = divmod(int(result.seconds), 60)
    lines = [f"finished in {minutes}m{seconds:02d}s; best epoch {result.best_epoch}"]
    metrics = result.metrics
    for split in ("val", "test"):
        if f"{split}/dice" not in metrics:
            continue
        classes = sorted(k for k in metrics if k.startswith(f"{split}/dice/") and not k.endswith(STATISTICS)
                         and k != f"{split}/dice/mean")
        distance = next((k for k in (f"{split}/hd95/mean", f"{split}/hd95_px/mean") if k in metrics), None)
        parts = [f"dice={_interval(metrics, f'{split}/dice/mean')}",
                 *(f"{k.removeprefix(split + '/dice/')}={metrics[k]:.4f}" for k in classes)]
        if distance:
            parts.append(f"{distance.removeprefix(split + '/').removesuffix('/mean')}={metrics[distance]:.3g}")
        lines.append(f"  {split}: " + "  ".join(parts))
        if f"{split}/instance/pq" in metrics:
            lines.append(f"    {_objects(metrics, f'{split}/instance/')}")
        for key in sorted(k for k in metrics if k.startswith(f"{split}/fairness/") and k.endswith("/dice_gap")):
            attribute = key.split("/")[2]
            lines.append(f"    fairness {attribute}: dice gap {_interval(metrics, key)}")
    if result.test_looks is not None:
        lines.append(f"  {result.test_looks.line()}")
    if result.test_held_back:
        lines.append(f"  test: not evaluated ({result.test_held_back} cases held back, trainer.evaluate_test: false); "
                     f"when the settings are final, evaluate once: medseg evaluate --model runs:/{result.run_id} "
                     "--data EXPERIMENT.yaml --split test")
    lines.append(f"MLflow run {result.run_id} in experiment '{result.experiment_name}' ({result.tracking_uri})")
    if result.model_uri:
        lines.append(f"model: {result.model_uri}")
    lines.append(_look(result))
    return "\n".join(lines)


def _look(result: Any) -> str:
    """Where to see a run: ``medseg ui`` and its experiment's runs table (a tracking server's own UI)."""
    from medseg_lightning.tracking.experiments import look_at_run

    return look_at_run(result.tracking_uri, result.run_id)


def run_line(result: Any) -> str:
    """``MLflow run ID (URI); look at it: ...`` for any result with a ``run_id`` and ``tracking_uri``."""
    return f"MLflow run {result.run_id} ({result.tracking_uri}); {_look(result)}"


def format_calibration(result: Any) -> str:
    """The temperature, and the validation NLL and calibration error before and after (overall, and the gaps)."""
    fit, before, after = result.fit, result.before, result.after
    lines = [f"temperature {fit.temperature:.3f}, fitted on {fit.cases} val case(s) ({fit.voxels} foreground-region "
             f"voxels): NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f}"]
    for key in sorted(after):
        if key == "calibration/ece" or key.endswith("/ece_gap"):
            name = "ECE" if key == "calibration/ece" else f"{key.split('/')[1]} ECE gap"
            lines.append(f"  val {name}: {before.get(key, float('nan')):.4f} -> {after[key]:.4f}")
    lines.append(f"calibrated model: {result.model_uri}" + (f" (saved in {result.out})" if result.out else ""))
    lines.append("its effect on test: medseg evaluate --model <that model> --split test, once")
    return "\n".join(lines)


def format_evaluation(report: EvaluationReport) -> str:
    """Mean Dice with its interval, then each audited attribute's groups, worst group and gap."""
    summary = report.summary
    lines = [f"{report.split}: {int(summary.get('n_cases', 0))} cases, Dice {_interval(summary, 'dice/mean')}"]
    if "instance/pq" in summary:
        lines.append(f"  {_objects(summary, 'instance/')}")
    for item in report.audits:
        if not item.available:
            lines.append(f"  {item.attribute}: not audited ({item.note})")
            continue
        groups = ", ".join(f"{g.group} {g.dice.mean:.3f} (n={g.n})" if g.measured and g.dice else f"{g.group} too small"
                           for g in item.groups)
        gap = (f"; gap {item.dice_gap.mean:.3f} [{item.dice_gap.ci_low:.3f}, {item.dice_gap.ci_high:.3f}], "
               f"worst {item.worst_group}" if item.dice_gap else f"; {item.note}")
        lines.append(f"  {item.attribute}: {groups}{gap}")
    return "\n".join(lines)


def _objects(summary: dict[str, float], prefix: str) -> str:
    """The instance metrics: panoptic quality, mask AP and how many objects were found per case."""
    return (f"objects: PQ {_interval(summary, prefix + 'pq')}, mask AP {summary.get(prefix + 'ap', float('nan')):.3f}"
            f" (AP50 {summary.get(prefix + 'ap50', float('nan')):.3f}), per case {summary[prefix + 'n_pred']:.2f} "
            f"found / {summary[prefix + 'n_true']:.2f} true, count error {_interval(summary, prefix + 'count_error')}")


def _interval(summary: dict[str, float], key: str) -> str:
    return f"{summary.get(key, float('nan')):.4f} [{summary.get(key + '_ci_low', float('nan')):.4f}, " \
           f"{summary.get(key + '_ci_high', float('nan')):.4f}]"


def format_crossval(result: CrossValResult) -> str:
    """Per-fold test Dice, then the pooled audit over every case."""
    folds = "  ".join(f"fold {fold}: {_fold_dice(result, fold):.4f}" for fold in result.fold_runs)
    seeds = len(result.seed_runs)
    lines = [f"cross-validation, {len(result.fold_runs)} folds: {folds}",
             "pooled test predictions (every case tested once, by a model that never saw it):"]
    if seeds > 1:
        lines[0] += " (each case's metrics averaged over the seeds)"
        lines.append(_seed_line(result.spread, "test"))
    lines.append(format_evaluation(result.report))
    if result.model_uri:
        lines.append(f"fold ensemble (mean of the {len(result.fold_runs)} fold models' softmax): {result.model_uri}; "
                     f"register it with medseg promote --run {result.run_id}")
    return "\n".join([*lines, run_line(result)])


def format_repeats(result: RepeatsResult) -> str:
    """Each split's seed-averaged summary and the spread over seeds."""
    lines = [f"repeats over {len(result.seed_runs)} seeds ({', '.join(map(str, result.seed_runs))}):"]
    for split, report in result.reports.items():
        lines += [_seed_line(result.spread, split), format_evaluation(report)]
    if "test" not in result.reports:
        lines.append("test: not evaluated (trainer.evaluate_test: false)")
    lines.append(run_line(result))
    return "\n".join(lines)


def _seed_line(spread: dict[str, float], split: str) -> str:
    seeds = [key.split("/")[1] for key in spread if key.startswith("seeds/") and key.endswith(f"/{split}/dice")]
    values = ", ".join(f"{spread[f'seeds/{seed}/{split}/dice']:.4f}" for seed in seeds)
    return (f"{split} Dice over seeds: mean {spread[f'seeds/{split}/dice_mean']:.4f}, standard deviation "
            f"{spread[f'seeds/{split}/dice_std']:.4f} ({values}); below, each case averaged over seeds:")


def _fold_dice(result: CrossValResult, fold: int) -> float:
    values = [row["dice/mean"] for row in result.report.cases if row.get("fold") == fold]
    return sum(values) / len(values) if values else float("nan")


def format_crosssite(result: CrossSiteResult) -> str:
    """The cross-site table: each held-out group's Dice seen and unseen in training, and the drop."""
    attribute = result.attribute
    lines = [format_crossval(result.crossval).rsplit("\n", 1)[0], "",
             f"cross-{attribute} generalisation (Dice of each {attribute}'s cases; drop = seen - unseen, paired):",
             f"{attribute:>10} {'cases':>5}  {'seen in training':>24}  {'not seen':>24}  {'drop':>24}"]
    for item in result.groups:
        lines.append(f"{item.group:>10} {item.n:>5}  {_estimate(item.dice_in):>24}  {_estimate(item.dice_out):>24}  "
                     f"{_estimate(item.dice_drop):>24}")
    lines += [f"{item['group']:>10}  not held out: {item['reason']}" for item in result.not_measured]
    lines.append(run_line(result))
    return "\n".join(lines)


def _estimate(estimate: object) -> str:
    mean, low, high = (getattr(estimate, name) for name in ("mean", "ci_low", "ci_high"))
    return f"{mean:.4f} [{low:.4f}, {high:.4f}]"
