"""What may choose a model: validation (or training) metrics, never test ones. A setting chosen by reading test
scores (the best epoch, early stopping, a sweep's winner) turns the test score into a selection score, so the
schema and the sweep files refuse a ``test/...`` monitor or objective with this check."""

from __future__ import annotations

SELECTION_SPLITS = ("val/", "train/")


def check_selection_metric(metric: str, where: str) -> None:
    """A metric that chooses something (checkpoint, early stop, sweep objective) must not be a test metric.

    Raises:
        ValueError: naming where the metric was set and why it is refused.
    """
    if metric.startswith("test/"):
        raise ValueError(f"{where} {metric!r}: a test metric cannot choose the model (best epoch, early stopping or "
                         "sweep winner); the test score would then be a selection score, not an estimate for new "
                         f"patients. Use the validation metric {'val/' + metric.removeprefix('test/')!r}")
