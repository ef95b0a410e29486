"""Every evaluation of a test split, counted in the tracking store.

A run that scores a test split is tagged with the split's key (a hash of its cases' file contents) and the
configuration's hash. Counting the runs with a key answers "how often has this test split been looked at, and by
how many configurations?": once per configuration is a test result; many configurations on one split, and the
best of them is a selection result, however it is labelled. Deleted runs still count: a look cannot be undone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from medseg_lightning.tracking import CONFIG_HASH_TAG

TEST_SPLIT_TAG = "medseg.test_split"
DEFINITION_TAG = "medseg.test_split.definition"


@dataclass(frozen=True)
class SplitLooks:
    """How many evaluations of one test split the store holds, and by how many distinct configurations."""

    evaluations: int
    configurations: int
    others: int = 0  # configurations other than the one being evaluated now

    def line(self) -> str:
        times = "time" if self.evaluations == 1 else "times"
        kinds = "configuration" if self.configurations == 1 else "distinct configurations"
        return f"this test split has been evaluated {self.evaluations} {times} by {self.configurations} {kinds}"

    def as_dict(self) -> dict[str, int]:
        return {"evaluations": self.evaluations, "configurations": self.configurations}


def record_test_look(client: MlflowClient, run_id: str, split_key: str, definition: dict[str, Any],
                     config_hash: str) -> None:
    """Tags ``run_id`` as one evaluation of the test split ``split_key`` by configuration ``config_hash``."""
    client.set_tag(run_id, TEST_SPLIT_TAG, split_key)
    client.set_tag(run_id, DEFINITION_TAG, json.dumps(definition, sort_keys=True))
    client.set_tag(run_id, CONFIG_HASH_TAG, config_hash)


def count_test_looks(client: MlflowClient, split_key: str, config_hash: str | None = None) -> SplitLooks:
    """The evaluations of ``split_key`` in every experiment of the store (deleted runs included).

    Args:
        config_hash: the configuration about to be (or just) evaluated; ``others`` counts the rest.
    """
    experiments = [item.experiment_id for item in client.search_experiments(view_type=ViewType.ALL)]
    hashes: list[str] = []
    token = None
    while experiments:
        page = client.search_runs(experiments, f"tags.`{TEST_SPLIT_TAG}` = '{split_key}'",
                                  run_view_type=ViewType.ALL, max_results=10_000, page_token=token)
        hashes += [run.data.tags.get(CONFIG_HASH_TAG, run.info.run_id) for run in page]
        token = page.token
        if not token:
            break
    distinct = set(hashes)
    return SplitLooks(len(hashes), len(distinct), len(distinct - {config_hash}))
