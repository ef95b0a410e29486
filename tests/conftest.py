"""Shared fixtures: small synthetic cohorts on disk, experiment files pointing at them, an isolated cache."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from medseg_lightning.data.synth import generate_cohort

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own preprocessing cache, so tests never see each other's entries."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(cache))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri in a test sets it
    monkeypatch.delenv("MEDSEG_RUN_ID", raising=False)
    yield cache
    # monkeypatch only restores what it changed: a store a test selected would otherwise reach the module-scoped
    # fixtures of the next test file, which are set up before this fixture runs again
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only 12-case synthetic cohort (two cases per subject); copy it before changing files."""
    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(root, 12, seed=1, shape=(32, 32, 10), cases_per_subject=2)
    return root


@pytest.fixture
def make_experiment(tmp_path: Path) -> Callable[..., Path]:
    """Writes an experiment YAML for a data source; ``data`` entries are merged into the data section."""

    def write(source: Path, name: str = "test", **data: object) -> Path:
        config = {
            "name": name,
            "data": {
                "source": str(source),
                "labels": {0: "background", 1: "organ", 2: "lesion"},
                "preprocessing": {"target_size": [32, 32]},
                "split": {"n_folds": 3},
                "loader": {"batch_size": 4, "num_workers": 0},
                **data,
            },
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


@pytest.fixture
def data_root() -> Path:
    """The real datasets (../shared/data); tests that need them are skipped without MEDSEG_DATA_ROOT."""
    value = os.environ.get("MEDSEG_DATA_ROOT")
    if not value:
        pytest.skip("MEDSEG_DATA_ROOT is not set")
    return Path(value)
