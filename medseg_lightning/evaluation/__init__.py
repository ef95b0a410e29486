"""Evaluation: per-case metrics, instance metrics, bootstrap statistics, fairness audits, scoring a dataset split
with a model, and ``evaluate.run_evaluation`` (score -> audit -> report -> log) shared by train and the studies."""
