"""Whole-dataset check and preparation: every problem reported at once, before any training starts.

Checking a case needs the same decoding as preprocessing it, so the check *is* the preparation: valid cases
land in the cache and the next check or training run reads them back in milliseconds.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg_lightning.config.protocol import split_key
from medseg_lightning.config.schema import DataConfig
from medseg_lightning.data.attributes import apply_attributes
from medseg_lightning.data.cache import PreparedCase, PreprocessCache, default_cache_dir
from medseg_lightning.data.fingerprint import dataset_fingerprint
from medseg_lightning.data.manifest import Case, ManifestError, load_cases
from medseg_lightning.data.splits import assign_splits
from medseg_lightning.data.validate import Problem


class DataCheckError(ValueError):
    """The dataset has problems; the message lists each on its own line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {problem}" for problem in problems)
        super().__init__(f"{len(problems)} data problem(s) found (run `medseg data check`):\n{lines}")


@dataclass
class PreparedDataset:
    """The outcome of checking/preparing a dataset: valid cases, their splits, the fingerprint, the problems."""

    cases: list[PreparedCase]
    splits: dict[str, str]
    fingerprint: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    content_keys: dict[str, str] = field(default_factory=dict)  # case id -> digest of its files' content

    def split(self, name: str) -> list[PreparedCase]:
        return [case for case in self.cases if self.splits.get(case.case.case_id) == name]

    def split_key(self, name: str = "test") -> str:
        """The key of one split, a hash of its cases' content digests (``config.protocol.split_key``): the same
        patients give the same key whatever the preprocessing or the way the split was defined."""
        return split_key(self.content_keys[case.case.case_id] for case in self.split(name))

    def raise_for_problems(self) -> None:
        if self.problems:
            raise DataCheckError(self.problems)


def prepare_dataset(config: DataConfig, cache_dir: Path | None = None, workers: int = 4) -> PreparedDataset:
    """Checks every case and prepares the valid ones into the cache; never raises for data problems."""
    try:
        cases = load_cases(config.source, config.image_columns, config.mask_column, config.file_columns)
    except ManifestError as error:
        return PreparedDataset([], {}, {}, [Problem(str(error))])
    problems = _duplicate_ids(cases)
    if config.attributes is not None:  # before the split: folds may be stratified by these attributes
        problems += apply_attributes(cases, config.attributes)
    splits: dict[str, str] = {}
    try:
        splits = assign_splits(cases, config.split)
    except ManifestError as error:
        problems += [Problem(line) for line in str(error).splitlines()]
    cache = PreprocessCache(cache_dir or default_cache_dir(config), config)
    # cache hits load faster in one thread (the GIL makes a pool slower); misses decode in parallel
    outcomes = [cache.lookup(case) for case in cases]
    misses = [i for i, (prepared, case_problems) in enumerate(outcomes) if prepared is None and not case_problems]
    if misses:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(misses)))) as pool:
            for index, outcome in zip(misses, pool.map(cache.prepare, [cases[i] for i in misses]), strict=True):
                outcomes[index] = outcome
    cache.digests.save()
    prepared = [case for case, _ in outcomes if case is not None]
    problems += [problem for _, case_problems in outcomes for problem in case_problems]
    problems += _consistency(prepared, config)
    # statistics per channel need one channel count; a dataset that has several is refused anyway
    consistent = len({case.image.shape[1] for case in prepared}) == 1
    fingerprint = dataset_fingerprint(prepared, cache.settings, config) if prepared and consistent else {}
    content = {case.case.case_id: cache.content_key(case.case) for case in prepared}  # digests are memoised
    return PreparedDataset(prepared, splits, fingerprint, problems, content)


def _duplicate_ids(cases: list[Case]) -> list[Problem]:
    counts = Counter(case.case_id for case in cases)
    return [Problem(f"duplicate case id ({count} rows)", case_id) for case_id, count in counts.items() if count > 1]


def _consistency(prepared: list[PreparedCase], config: DataConfig) -> list[Problem]:
    """Problems between cases: differing channel counts, or in-plane sizes that cannot be batched."""
    problems = []
    if not prepared:
        return problems
    # the most common count is the dataset's, so one odd case (a 4D file among 3D ones) gets one line, even first
    counts = Counter(item.image.shape[1] for item in prepared)
    expected = counts.most_common(1)[0][0]  # ties: the count seen first
    reference = next(item for item in prepared if item.image.shape[1] == expected)
    for item in prepared:
        channels = item.image.shape[1]
        if channels != expected:
            files = item.case.image_paths
            source = (f"a 4D image with {channels} volumes" if len(files) == 1 and channels > 1
                      else f"{len(files)} image file(s)")
            problems.append(Problem(
                f"{channels} channel(s) ({source}), but most cases have {expected} (e.g. case "
                f"{reference.case.case_id})",
                item.case.case_id, str(files[0])))
    sizes = Counter(tuple(item.image.shape[2:]) for item in prepared)
    if config.preprocessing.target_size is None and len(sizes) > 1:
        shown = ", ".join(f"{size} x{count}" for size, count in sizes.most_common(4))
        problems.append(Problem(f"cases have different in-plane sizes ({shown}); set data.preprocessing.target_size"))
    return problems
