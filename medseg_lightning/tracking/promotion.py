"""Promotion gates: what a run must show before its model becomes a registered version.

Gates read the run's logged metrics (the same numbers as its model card), so a promotion decision can be checked
by anyone in the MLflow UI. A metric the run never logged fails its gate: a model that was not measured is not
promoted by accident.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from medseg_lightning.config.schema import PromotionConfig
from medseg_lightning.utilities.names import metric_name


@dataclass
class GateResult:
    """One gate: its name, the rule, the run's value (None when the run did not log it) and the verdict."""

    gate: str
    rule: str
    threshold: float
    value: float | None
    passed: bool

    def line(self) -> str:
        shown = "not logged" if self.value is None else f"{self.value:.4f}"
        return f"{'PASS' if self.passed else 'FAIL'}  {self.gate}: {shown} (required {self.rule} {self.threshold:g})"


def evaluate_gates(metrics: dict[str, float], gates: PromotionConfig) -> list[GateResult]:
    """Every configured gate against the run's metrics, in a stable order."""
    split = gates.split
    checks: list[tuple[str, str, float, str]] = []  # gate, metric, threshold, rule
    if gates.min_dice is not None:
        checks.append((f"{split}/dice", f"{split}/dice", gates.min_dice, ">="))
    for name, threshold in sorted(gates.min_class_dice.items()):
        checks.append((f"{split}/dice/{name}", f"{split}/dice/{metric_name(name)}", threshold, ">="))
    for attribute, threshold in sorted(gates.max_fairness_gap.items()):
        key = f"{split}/fairness/{metric_name(attribute)}/dice_gap"
        checks.append((key, key, threshold, "<="))
    if gates.min_cases is not None:
        checks.append((f"{split}/n_cases", f"{split}/n_cases", float(gates.min_cases), ">="))
    results = [_check(gate, metrics.get(metric), threshold, rule) for gate, metric, threshold, rule in checks]
    if gates.require_all_groups_measured:
        too_small = [key for key, value in metrics.items()
                     if key.startswith(f"{split}/fairness/") and key.endswith("/groups_too_small")]
        worst = max((metrics[key] for key in too_small), default=None)
        results.append(_check(f"{split}/fairness/*/groups_too_small", worst, 0.0, "<="))
    return results


def _check(gate: str, value: float | None, threshold: float, rule: str) -> GateResult:
    if value is None or not math.isfinite(value):
        return GateResult(gate, rule, threshold, None, False)
    passed = value >= threshold if rule == ">=" else value <= threshold
    return GateResult(gate, rule, threshold, float(value), bool(passed))


def merge_gates(configured: PromotionConfig, overrides: dict[str, object]) -> PromotionConfig:
    """The run's ``promotion:`` section with command-line gates on top (dict gates merge per key)."""
    data = configured.model_dump()
    for key, value in overrides.items():
        if value is None or value == {} or value is False:
            continue
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return PromotionConfig.model_validate(data)


def gate_records(results: list[GateResult]) -> list[dict[str, object]]:
    return [asdict(result) for result in results]


@dataclass
class PromotionResult:
    name: str
    version: str | None
    gates: list[GateResult]
    forced: bool
    run_id: str
    moved_from: str | None = None
    no_gates: bool = False  # neither the run's config nor the command line set a gate: nothing was checked
    scored_test: bool = True  # the run logged test metrics (a development run or sweep trial logs none)


def promote_run(run_id: str, name: str, alias: str | None, gate_overrides: dict[str, object],
                force_reason: str | None, root: Path) -> PromotionResult:
    """Checks the gates on the run's metrics and, when they pass (or ``force_reason`` is given), registers the
    run's logged model as a new version of ``name`` with provenance tags and the model card as description."""
    import tempfile

    import yaml

    from medseg_lightning.config.schema import ExperimentConfig
    from medseg_lightning.reporting.model_card_render import render_summary
    from medseg_lightning.tracking import registry

    client = registry.client_for(root)
    run = registry.get_run(client, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        config_text = registry.run_artifact_text(client, run_id, "config.yaml", Path(tmp)) or ""
        card_markdown = registry.run_artifact_text(client, run_id, "model_card/model_card.md", Path(tmp))
        card_json = registry.run_artifact_text(client, run_id, "model_card/model_card.json", Path(tmp))
    configured = ExperimentConfig.model_validate(yaml.safe_load(config_text)).promotion if config_text else \
        PromotionConfig()
    gates = evaluate_gates(run.data.metrics, merge_gates(configured, gate_overrides))
    # no gate is no evidence: a model nobody checked needs a recorded reason, like one that failed its gates
    passed = bool(gates) and all(gate.passed for gate in gates)
    result = PromotionResult(name=name, version=None, gates=gates, forced=not passed and bool(force_reason),
                             run_id=run_id, no_gates=not gates,
                             scored_test=any(key.startswith("test/") for key in run.data.metrics))
    if not passed and not force_reason:
        return result
    tags = {key: value for key, value in {
        "source_run_id": run_id, "git.commit": run.data.tags.get("git.commit"),
        "git.dirty": run.data.tags.get("git.dirty"), "data.fingerprint": run.data.tags.get("data.fingerprint"),
        "data.dvc_md5": run.data.tags.get("data.dvc_md5"), "optuna.study": run.data.tags.get("optuna.study"),
        "optuna.trial": run.data.tags.get("optuna.trial"),
        "config.sha256": registry.config_hash(config_text) if config_text else None,
        "gates": json.dumps(gate_records(gates)), "gates.passed": str(passed).lower(),
        "promotion.forced_reason": force_reason if result.forced else None,
    }.items() if value}
    description = card_markdown or f"Model of run {run_id} (no model card logged)."
    if len(description) > registry.DESCRIPTION_LIMIT and card_json:
        description = render_summary(json.loads(card_json)) + (
            f"\nFull model card: artifact `model_card/model_card.md` of run {run_id}.\n")
    version, moved = registry.register_version(client, registry.logged_model_uri(client, run), name, alias, tags,
                                               description)
    result.version, result.moved_from = str(version.version), moved
    return result
