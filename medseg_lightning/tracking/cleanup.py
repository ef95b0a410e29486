"""``medseg gc``: free the disk that finished runs no longer need, never what a user can still resume.

Local checkpoints live in ``mlruns/checkpoints/<run id>/``. A run that finished keeps its logged model (the
weights a user predicts with), so its checkpoints only cost disk; a run that failed, was interrupted or is still
running needs its last checkpoint to resume. A folder whose run the store does not know is left alone: it may
belong to another store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient


@dataclass
class Cleanup:
    """What ``collect`` found: folders removed (or to remove) with their bytes, and folders kept with the reason."""

    removed: list[tuple[Path, int]] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.removed)


def collect(client: MlflowClient, root: Path, dry_run: bool = False) -> Cleanup:
    """Removes the checkpoint folders of finished and deleted runs under ``root/mlruns/checkpoints``."""
    result = Cleanup()
    folder = root / "mlruns" / "checkpoints"
    for run_folder in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not run_folder.is_dir():
            continue
        try:
            run = client.get_run(run_folder.name)
        except mlflow.exceptions.MlflowException:
            result.kept.append((run_folder, "no such run in this store"))
            continue
        deleted = run.info.lifecycle_stage == "deleted"
        if run.info.status != "FINISHED" and not deleted:
            result.kept.append((run_folder, f"{run.info.status.lower()}: resumable"))
            continue
        size = sum(path.stat().st_size for path in run_folder.rglob("*") if path.is_file())
        result.removed.append((run_folder, size))
        if not dry_run:
            for path in sorted(run_folder.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
            run_folder.rmdir()
    return result
