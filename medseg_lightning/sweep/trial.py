"""The trial's side, inside the ``medseg train`` process a sweep launched: report, prune, hand back the result.

The sweep passes the trial's coordinates in ``MEDSEG_TRIAL`` (JSON). Lightning's DDP launcher starts the other
ranks with the same environment, so every rank gets the callback: rank 0 reports the monitored metric to Optuna
after each validation and asks the pruner, then broadcasts the answer, so all ranks stop together. Optuna's own
``PyTorchLightningPruningCallback`` raises ``TrialPruned`` inside ``fit``, which assumes the objective runs in the
training process; here the objective is another process, so a pruned run ends normally, still tests its best
checkpoint and logs its model, and says "pruned" in the result file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from medseg_lightning.utilities.files import atomic_write

if TYPE_CHECKING:
    from medseg_lightning.training.train import RunHooks, RunResult

TRIAL_ENV = "MEDSEG_TRIAL"


@dataclass
class TrialLink:
    """Where a launched training run reports to, and where it leaves its result."""

    storage: str
    study: str
    trial_id: int
    number: int
    monitor: str
    result_file: str
    pruner: dict[str, Any]  # the sweep's PrunerConfig: Optuna studies do not store their pruner
    max_epochs: int | str = "auto"
    report: bool = True  # Optuna takes intermediate values (and prunes) for a single objective only


def trial_link() -> TrialLink | None:
    """The trial this process trains for, or None outside a sweep."""
    value = os.environ.get(TRIAL_ENV)
    return TrialLink(**json.loads(value)) if value else None


class PruningCallback(Callback):
    """Reports ``monitor`` after every validation (rank 0) and stops all ranks when the pruner says so."""

    def __init__(self, link: TrialLink) -> None:
        self.link = link
        self.pruned_at: int | None = None
        self._trial: Any = None

    def _optuna_trial(self) -> Any:
        if self._trial is None:
            import optuna

            from medseg_lightning.sweep.config import PrunerConfig
            from medseg_lightning.sweep.study import make_pruner

            pruner = make_pruner(PrunerConfig(**self.link.pruner), self.link.max_epochs)
            study = optuna.load_study(study_name=self.link.study, storage=self.link.storage, pruner=pruner)
            self._trial = optuna.trial.Trial(study, self.link.trial_id)
        return self._trial

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.link.report or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # not the validation of a training epoch (the final validation of the best model)
        prune = False
        value = trainer.callback_metrics.get(self.link.monitor)
        if trainer.is_global_zero and value is not None and math.isfinite(float(value)):
            trial = self._optuna_trial()
            trial.report(float(value), step=trainer.current_epoch)
            prune = bool(trial.should_prune())
        prune = trainer.strategy.broadcast(prune)
        if prune:
            trainer.should_stop = True
            self.pruned_at = trainer.current_epoch


def write_result(link: TrialLink, run_id: str, metrics: dict[str, float], pruned_at: int | None,
                 epochs: int) -> None:
    """The result file the sweep reads: the best checkpoint's metrics, the run id, and whether it was pruned."""
    result = {"run_id": run_id, "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
              "pruned_at": pruned_at, "epochs": epochs, "link": asdict(link)}
    text = json.dumps(result, indent=2)
    atomic_write(Path(link.result_file), lambda temporary: temporary.write_text(text))  # never half a file


def trial_hooks() -> RunHooks | None:
    """What an Optuna trial adds to the training run it launched (None outside a sweep): the pruning callback, and
    the result file written once the run is logged."""
    from medseg_lightning.training.train import RunHooks

    link = trial_link()
    if link is None:
        return None
    pruning = PruningCallback(link)

    def finished(result: RunResult, epochs: int) -> None:
        write_result(link, result.run_id, result.metrics, pruning.pruned_at, epochs)

    return RunHooks(callbacks=[pruning], on_finished=finished)
