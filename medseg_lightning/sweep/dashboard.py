"""``medseg sweep dashboard``: optuna-dashboard on a sweep's study, for its history, parallel coordinates and
parameter importances live while the sweep runs."""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path

from medseg_lightning.sweep.config import load_sweep
from medseg_lightning.sweep.study import existing_study, redact, storage_url

HOST = "127.0.0.1"  # the dashboard can edit a study (notes, trial states): never on every interface


@dataclass(frozen=True)
class Dashboard:
    """The server command and what to tell the user."""

    command: list[str]
    url: str  # the study's page
    storage: str  # without password


def dashboard(path: Path, overrides: list[str] | None = None, port: int = 8080) -> Dashboard:
    """The optuna-dashboard command for the sweep's storage, listening on 127.0.0.1:``port``.

    Raises:
        ValueError: the storage has no study of this sweep yet, or optuna-dashboard is not installed.
    """
    sweep, _ = load_sweep(path, overrides)
    url = storage_url(sweep, path)
    _, study_id = existing_study(url, sweep.name or "", path)
    command = [*_program(), url, "--host", HOST, "--port", str(port)]
    return Dashboard(command=command, url=f"http://{HOST}:{port}/dashboard/studies/{study_id}", storage=redact(url))


def _program() -> list[str]:
    """optuna-dashboard's console script run by this interpreter, so it reads the storage with this environment's
    Optuna and database drivers whatever ``PATH`` holds."""
    scripts = importlib.metadata.entry_points(group="console_scripts", name="optuna-dashboard")
    if not scripts:
        raise ValueError("optuna-dashboard is not installed: pip install 'optuna-dashboard>=0.21'")
    module, _, function = next(iter(scripts)).value.partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.argv[0] = 'optuna-dashboard'; "
                                  f"sys.exit({function}())"]
