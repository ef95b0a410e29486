"""``medseg results``: the tables a report shows, built from the tracking store, never typed by hand.

A row is one MLflow run: a training run, an evaluation, a cross-validation (folds pooled, each case tested once)
or a repeat over seeds (each case averaged over the seeds). Its cells are the logged metrics of one split, per
class and mean, with their bootstrap intervals over cases, the spread over seeds where there are several, and
what reproduces the row: the command, the configuration hash, the git commit and the dataset fingerprint.
Nothing here imports MLflow: ``tracking/results.py`` turns runs into :class:`RunRecord` s.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATISTICS = ("_median", "_std", "_ci_low", "_ci_high")
IGNORED_SETTINGS = ("name", "description", "tracking.", "model_card.", "promotion.", "fairness.", "data.source",
                    "data.cache_dir", "data.loader.num_workers", "data.loader.persistent_workers",
                    "data.loader.pin_memory", "data.attributes.table", "trainer.evaluate_test",
                    "trainer.log_every_n_steps", "trainer.inference_batch_size")
KINDS = {"": "training", "cross-validation": "cross-validation", "repeats": "repeats", "evaluation": "evaluation",
         "cross-site": "cross-site", "sweep": "sweep", "calibration": "calibration"}


@dataclass
class RunRecord:
    """What a results row needs from one run (plain data, so tables can be tested without a store)."""

    run_id: str
    name: str
    metrics: dict[str, float]
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return KINDS.get(self.tags.get("medseg.kind", ""), self.tags.get("medseg.kind", ""))


@dataclass
class ResultsTable:
    """Rows of one split: display columns for Markdown, every value for CSV."""

    split: str
    classes: list[str]
    distance: str | None
    records: list[RunRecord]
    instance: bool  # some rows scored objects (Mask R-CNN, or a semantic model's connected components)
    settings: dict[str, str]  # run id -> the settings in which it differs from the other rows


def build_table(records: list[RunRecord], split: str = "test") -> ResultsTable:
    """The table of ``records`` on ``split``.

    Raises:
        ValueError: no record logged metrics of ``split`` (naming the splits they did log).
    """
    measured = [record for record in records if f"{split}/dice" in record.metrics]
    if not measured:
        logged = sorted({key.split("/")[0] for record in records for key in record.metrics if "/" in key})
        raise ValueError(f"none of the {len(records)} selected run(s) logged {split}/dice (they logged: "
                         f"{', '.join(logged) or 'nothing'}); choose other runs or another --split")
    classes = _classes(measured, split)
    distance = next((name for name in ("hd95", "hd95_px") if any(f"{split}/{name}/mean" in r.metrics
                                                                for r in measured)), None)
    instance = any(f"{split}/instance/pq" in record.metrics for record in measured)
    return ResultsTable(split, classes, distance, measured, instance, differing_settings(measured))


def _classes(records: list[RunRecord], split: str) -> list[str]:
    """Foreground classes in label order (from the logged ``data.labels.N`` params), else as logged."""
    found: list[str] = []
    for record in records:
        labelled = sorted((int(key.rsplit(".", 1)[1]), value) for key, value in record.params.items()
                          if re.fullmatch(r"data\.labels\.\d+", key))
        names = [name for index, name in labelled if index > 0] or sorted(
            key.removeprefix(f"{split}/dice/") for key in record.metrics if key.startswith(f"{split}/dice/")
            and key != f"{split}/dice/mean" and not key.endswith(STATISTICS))
        found += [name for name in names if name not in found and f"{split}/dice/{name}" in record.metrics]
    return found


def differing_settings(records: list[RunRecord]) -> dict[str, str]:
    """For each run, the settings (params) whose values differ between the rows, as ``key=value`` text."""
    keys = sorted({key for record in records for key in record.params
                   if not key.startswith(IGNORED_SETTINGS) and key != "seed"})
    varying = [key for key in keys if len({record.params.get(key) for record in records}) > 1]
    return {record.run_id: ", ".join(f"{key}={record.params.get(key, 'unset')}" for key in varying)
            for record in records}


def _estimate(metrics: dict[str, float], key: str, digits: int = 4) -> str:
    value = metrics.get(key)
    if value is None or not math.isfinite(value):
        return "n/a"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _count(value: float | None, default: str = "1") -> str:
    return str(int(value)) if value is not None and math.isfinite(value) else default


def _seed_std(record: RunRecord, split: str) -> str:
    value = record.metrics.get(f"seeds/{split}/dice_std")
    return f"{value:.4f}" if value is not None and _count(record.metrics.get("seeds/n")) != "1" else "n/a"


def to_markdown(table: ResultsTable) -> str:
    """A results table and its provenance table, in Markdown."""
    split, level = table.split, "95% CI"
    show_settings = any(table.settings.values())
    header = ["run", *(["settings"] if show_settings else []), "kind", "cases", "folds", "seeds",
              *(f"{name} Dice" for name in table.classes), f"mean Dice [{level}]", "std over seeds",
              *([f"HD95 ({'px' if table.distance == 'hd95_px' else 'mm'})"] if table.distance else []),
              *(["PQ [95% CI]", "objects found / true", "count error [95% CI]"] if table.instance else [])]
    rows = []
    for record in table.records:
        metrics = record.metrics
        row = [record.name, *([table.settings[record.run_id] or "(as the others)"] if show_settings else []),
               record.kind, _count(metrics.get(f"{split}/n_cases"), "n/a"), _count(metrics.get("cv/n_folds")),
               _count(metrics.get("seeds/n")),
               *(_estimate(metrics, f"{split}/dice/{name}") for name in table.classes),
               _estimate(metrics, f"{split}/dice/mean"), _seed_std(record, split)]
        if table.distance:
            row.append(_estimate(metrics, f"{split}/{table.distance}/mean", 2))
        if table.instance:
            found, true = metrics.get(f"{split}/instance/n_pred"), metrics.get(f"{split}/instance/n_true")
            row += [_estimate(metrics, f"{split}/instance/pq", 3),
                    f"{found:.2f} / {true:.2f}" if found is not None and true is not None else "n/a",
                    _estimate(metrics, f"{split}/instance/count_error", 2)]
        rows.append(row)
    provenance = [[record.name, f"`{record.tags.get('medseg.command', 'n/a (not run from the command line)')}`",
                   f"`{record.tags.get('medseg.config_hash', 'n/a')}`", f"`{record.tags.get('git.commit', 'n/a')[:10]}`"
                   + (" (dirty)" if record.tags.get("git.dirty") == "true" else ""),
                   f"`{record.tags.get('data.fingerprint', '')[:12] or 'n/a'}`"] for record in table.records]
    note = (f"Split `{split}`: metrics per case in 3D, averaged over cases; intervals are 95% bootstrap intervals over "
            "cases. Cross-validation rows pool the folds (each case tested once, by the fold model that never saw "
            "it); rows with several seeds average each case over the seeds first.")
    return "\n".join([_md(header), _md(["---"] * len(header)), *map(_md, rows), "", note, "",
                      _md(["run", "command", "configuration", "git commit", "data fingerprint"]),
                      _md(["---"] * 5), *map(_md, provenance)]) + "\n"


def to_csv(table: ResultsTable) -> str:
    """Every value of the table, one run per row, with its run id."""
    split = table.split
    keys = [*(f"dice/{name}" for name in table.classes), "dice/mean",
            *([f"{table.distance}/mean"] if table.distance else []),
            *(["instance/pq", "instance/count_error", "instance/n_pred", "instance/n_true"] if table.instance else [])]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["run_id", "run", "kind", "settings", "n_cases", "n_folds", "n_seeds",
                     *(f"{key}{suffix}" for key in keys for suffix in ("", "_ci_low", "_ci_high")), "dice_seed_std",
                     "command", "config_hash", "git_commit", "data_fingerprint"])
    for record in table.records:
        metrics = record.metrics
        values = [metrics.get(f"{split}/{key}{suffix}") for key in keys for suffix in ("", "_ci_low", "_ci_high")]
        writer.writerow([record.run_id, record.name, record.kind, table.settings[record.run_id],
                         _count(metrics.get(f"{split}/n_cases"), ""), _count(metrics.get("cv/n_folds")),
                         _count(metrics.get("seeds/n")), *("" if v is None else f"{v:.6g}" for v in values),
                         metrics.get(f"seeds/{split}/dice_std", ""), record.tags.get("medseg.command", ""),
                         record.tags.get("medseg.config_hash", ""), record.tags.get("git.commit", ""),
                         record.tags.get("data.fingerprint", "")])
    return out.getvalue()


def crosssite_markdown(records: list[RunRecord]) -> str:
    """Cross-site runs: per held-out group, its cases' Dice seen and unseen in training and the paired drop."""
    blocks = []
    for record in records:
        metrics = record.metrics
        groups = sorted({(parts[1], parts[2]) for parts in (key.split("/") for key in metrics)
                         if len(parts) == 4 and parts[0] == "crosssite" and parts[3] == "dice_drop"})
        if not groups:
            raise ValueError(f"run {record.run_id} ({record.name}) logged no crosssite/<attribute>/<group>/dice_drop")
        attribute = groups[0][0]
        rows = [[group, _count(metrics.get(f"crosssite/{attr}/{group}/n"), "n/a"),
                 *(_estimate(metrics, f"crosssite/{attr}/{group}/{name}") for name in ("dice_in", "dice_out",
                                                                                     "dice_drop"))]
                for attr, group in groups]
        mean = metrics.get(f"crosssite/{attribute}/dice_drop_mean")
        provenance = (f"Command: `{record.tags.get('medseg.command', 'n/a')}`; configuration "
                      f"`{record.tags.get('medseg.config_hash', 'n/a')}`; git commit "
                      f"`{record.tags.get('git.commit', 'n/a')[:10]}`.")
        blocks.append("\n".join([
            f"{record.name}: held-out {attribute}; seen = the pooled cross-validation, unseen = a model trained and "
            f"validated on the other groups; drop = seen - unseen, paired per case, 95% bootstrap intervals.", "",
            _md([attribute, "cases", "seen in training", "not seen", "drop"]), _md(["---"] * 5), *map(_md, rows), "",
            (f"Mean drop over the groups: {mean:.4f}. " if mean is not None else "") + provenance]))
    return "\n\n".join(blocks) + "\n"


def uncertainty_markdown(records: list[RunRecord], split: str = "test") -> str:
    """Per run and uncertainty score: how well the score ranks the split's cases by their Dice (Spearman, and the
    area under the risk-coverage curve between the oracle's and a random order's, ``uncertainty_ranking.py``).

    Raises:
        ValueError: no record logged ranking figures on ``split``.
    """
    rows = []
    for record in records:
        scores = sorted({key.split("/")[2] for key in record.metrics
                         if key.startswith(f"{split}/uncertainty/") and key.endswith("/spearman")})
        for score in scores:
            prefix = f"{split}/uncertainty/{score}"
            rows.append([record.name, f"`{score}`", _count(record.metrics.get(f"{prefix}/n"), "n/a"),
                         *(_estimate(record.metrics, f"{prefix}/{name}", 3)
                           for name in ("spearman", "aurc", "aurc_oracle", "aurc_random"))])
    if not rows:
        raise ValueError(f"none of the {len(records)} selected run(s) logged {split}/uncertainty/<score>/spearman")
    provenance = [[record.name, f"`{portable_command(record.tags.get('medseg.command', 'n/a'))}`",
                   f"`{record.tags.get('medseg.config_hash', 'n/a')}`",
                   f"`{record.tags.get('git.commit', 'n/a')[:10]}`"] for record in records]
    note = (f"Split `{split}`. Spearman: rank correlation of the score with the case's Dice (a useful uncertainty "
            "score is clearly negative). AURC: area under the risk-coverage curve, risk = 1 - mean Dice of the cases "
            "kept as the most uncertain are set aside (lower is better), between the oracle (cases sorted by their "
            "Dice) and random (no skill).")
    return "\n".join([_md(["run", "score", "cases", "Spearman with Dice", "AURC", "AURC oracle", "AURC random"]),
                      _md(["---"] * 7), *map(_md, rows), "", note, "",
                      _md(["run", "command", "configuration", "git commit"]), _md(["---"] * 4),
                      *map(_md, provenance)]) + "\n"


CALIBRATION_RUN = "<CALIBRATION_RUN_ID>"


def portable_command(command: str, run_placeholder: str = "<RUN_ID>") -> str:
    """A logged command as a page may show it: run ids (of one store) as a placeholder, absolute paths (of one
    machine) as their last part."""
    command = re.sub(r"runs:/[0-9a-f]{32}", f"runs:/{run_placeholder}", command)
    return " ".join(Path(part).name if part.startswith("/") else part for part in command.split(" "))


def calibration_markdown(records: list[RunRecord], links: dict[str, dict[str, RunRecord]]) -> str:
    """Calibration runs: the temperature, and the calibration error of the model before and after it, on the
    validation split that fitted it and on the test split (the trained model's test pass against one test
    evaluation of the calibrated model; n/a until that evaluation has run)."""
    header = ["run", "temperature", "val cases", "val NLL before -> after", "val ECE before -> after",
              "test cases", "test ECE before -> after", "test Dice before / after"]
    rows = []
    for record in records:
        metrics = record.metrics
        source = links.get(record.run_id, {}).get("source")
        test = links.get(record.run_id, {}).get("test")
        before = source.metrics if source is not None else {}
        after = test.metrics if test is not None else {}
        rows.append([record.name, _estimate(metrics, "val/calibration/temperature", 3),
                     _count(metrics.get("val/n_cases"), "n/a"),
                     f"{_estimate(metrics, 'val/calibration/nll_uncalibrated')} -> "
                     f"{_estimate(metrics, 'val/calibration/nll')}",
                     f"{_estimate(metrics, 'val/calibration/ece_uncalibrated')} -> "
                     f"{_estimate(metrics, 'val/calibration/ece')}",
                     _count(after.get("test/n_cases") or before.get("test/n_cases"), "n/a"),
                     f"{_estimate(before, 'test/calibration/ece')} -> {_estimate(after, 'test/calibration/ece')}",
                     f"{_estimate(before, 'test/dice/mean')} / {_estimate(after, 'test/dice/mean')}"])
    provenance = []
    for record in records:
        test = links.get(record.run_id, {}).get("test")
        evaluated = (f"`{portable_command(test.tags.get('medseg.command', 'n/a'), CALIBRATION_RUN)}`"
                     if test is not None else "not evaluated on test yet")
        provenance.append([record.name, f"`{portable_command(record.tags.get('medseg.command', 'n/a'))}`", evaluated,
                           f"`{record.tags.get('git.commit', 'n/a')[:10]}`"])
    note = ("NLL: mean negative log-likelihood of the validation voxels that the prediction or the reference calls "
            "foreground (what the temperature minimises); ECE: expected calibration error over the same region, "
            "per case in 3D and pooled (10 bins). The temperature was chosen on validation only; the test columns "
            "are one look each.")
    return "\n".join([_md(header), _md(["---"] * len(header)), *map(_md, rows), "", note, "",
                      _md(["run", "calibrate command", "test evaluation command", "git commit"]), _md(["---"] * 4),
                      *map(_md, provenance)]) + "\n"


def _md(cells: list[Any]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def insert_between_markers(path: Path, name: str, text: str) -> None:
    """Replaces what lies between ``<!-- medseg-results NAME -->`` and ``<!-- /medseg-results -->`` in ``path``.

    Raises:
        ValueError: the file has no such marker pair.
    """
    content = path.read_text()
    pattern = re.compile(rf"(<!-- medseg-results {re.escape(name)} -->\n).*?(<!-- /medseg-results -->)", re.S)
    if not pattern.search(content):
        raise ValueError(f"{path}: no '<!-- medseg-results {name} -->' ... '<!-- /medseg-results -->' block")
    path.write_text(pattern.sub(lambda match: match.group(1) + text + match.group(2), content, count=1))
