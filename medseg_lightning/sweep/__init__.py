"""Optuna sweeps: every Optuna import of the project lives in this package."""
