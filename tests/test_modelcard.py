"""Model cards: every section in every format, the exact numbers, the generated caveats, no small-group leaks."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from medseg_lightning.config.schema import ExperimentConfig, FairnessConfig
from medseg_lightning.reporting.model_card import SECTIONS, CardInputs, build_card, fmt_estimate, generated_caveats
from medseg_lightning.reporting.model_card_render import (
    DESCRIPTION_LIMIT,
    render_html,
    render_markdown,
    render_summary,
    write_card,
)

SUMMARY_MM = {
    "dice/mean": 0.8234567, "dice/mean_median": 0.84, "dice/mean_std": 0.061, "dice/mean_ci_low": 0.8012,
    "dice/mean_ci_high": 0.8411, "dice/anterior": 0.81, "dice/anterior_median": 0.83, "dice/anterior_std": 0.07,
    "dice/anterior_ci_low": 0.79, "dice/anterior_ci_high": 0.83, "iou/mean": 0.71, "iou/mean_median": 0.72,
    "iou/mean_std": 0.05, "iou/mean_ci_low": 0.69, "iou/mean_ci_high": 0.73, "hd95/mean": 2.345,
    "hd95/mean_median": 2.0, "hd95/mean_std": 1.1, "hd95/mean_ci_low": 1.9, "hd95/mean_ci_high": 2.8,
    "assd/mean": float("nan"), "assd/mean_median": float("nan"), "assd/mean_std": float("nan"),
    "assd/mean_ci_low": float("nan"), "assd/mean_ci_high": float("nan"), "vol_err_ml/anterior": -0.125,
    "vol_err_ml/anterior_median": -0.1, "vol_err_ml/anterior_std": 0.2, "vol_err_ml/anterior_ci_low": -0.2,
    "vol_err_ml/anterior_ci_high": -0.05, "n_cases": 20.0,
}


def _group(name: str, n: int, mean: float, low: float, high: float) -> dict[str, Any]:
    return {"group": name, "n": n, "measured": True, "dice": {"mean": mean, "ci_low": low, "ci_high": high},
            "dice_per_class": {"anterior": {"mean": mean - 0.01, "ci_low": low - 0.01, "ci_high": high - 0.01},
                               "posterior": {"mean": mean + 0.01, "ci_low": low + 0.01, "ci_high": high + 0.01}},
            "hd95": 1.4321, "distance_unit": "mm"}


def _fairness() -> dict[str, Any]:
    """A measured gap above threshold (sex), a too-small group, an attribute that is missing (ethnicity)."""
    sex = {"attribute": "sex", "available": True, "bins": None,
           "groups": [_group("F", 40, 0.7712, 0.7401, 0.8023), _group("M", 45, 0.8588, 0.8322, 0.8811),
                      {"group": "unknown", "n": None, "measured": False}],
           "worst_group": "F", "best_group": "M", "dice_worst": 0.7712, "dice_best": 0.8588,
           "dice_gap": {"mean": 0.0876, "ci_low": 0.0456, "ci_high": 0.1299}, "dice_ratio": 0.8980, "note": None}
    age = {"attribute": "age", "available": True, "bins": [0.0, 40.0, 60.0, 120.0],
           "groups": [_group("0-40", 30, 0.83, 0.8, 0.86), _group("40-60", 25, 0.81, 0.78, 0.84)],
           "worst_group": "40-60", "best_group": "0-40", "dice_worst": 0.81, "dice_best": 0.83,
           "dice_gap": {"mean": 0.02, "ci_low": -0.02, "ci_high": 0.06}, "dice_ratio": 0.976, "note": None}
    ethnicity = {"attribute": "ethnicity", "available": False, "bins": None, "groups": [], "worst_group": None,
                 "best_group": None, "dice_worst": None, "dice_best": None, "dice_gap": None, "dice_ratio": None,
                 "note": "not in the manifest"}
    return {"split": "test", "metric": "dice/mean", "confidence": 0.95, "n_bootstrap": 1000, "min_group_size": 10,
            "gap_threshold": 0.05, "attributes": [sex, age, ethnicity]}


def _inputs(tmp_path: Path, *, intended_use: str = "Research on hippocampus volumetry in adults.",
            summary: dict[str, float] | None = None, spacing_known: bool = True, **overrides: Any) -> CardInputs:
    config = ExperimentConfig(
        name="hippo-unet", description="Hippocampus segmentation",
        data={"source": tmp_path / "alice" / "hippocampus" / "manifest.csv",
              "labels": {0: "background", 1: "anterior", 2: "posterior"}, "image_columns": ["t1"],
              "preprocessing": {"target_size": [64, 48]}},
        model={"arch": "unet", "encoder": "resnet18", "pretrained": "timm"},
        fairness={"attributes": ["sex", "age", "ethnicity"], "bins": {"age": [0, 40, 60, 120]}},
        model_card={"owners": ["Imaging Lab"], "license": "CC-BY-4.0", "intended_use": intended_use,
                    "out_of_scope_uses": ["Paediatric scans"], "ethical_considerations": ["Single-site data."],
                    "caveats": ["Trained on one scanner vendor."], "recommendations": ["Validate locally first."],
                    "min_test_cases": 30},
    )
    values: dict[str, Any] = {
        "config": config, "kind": "evaluation", "run_id": "run123", "created": "2026-11-02T10:00:00+00:00",
        "git_commit": "abc1234", "git_dirty": True, "package_version": "0.1.0", "evaluation_split": "test",
        "summary": SUMMARY_MM if summary is None else summary, "fairness": _fairness(),
        "split_counts": {"train": 150, "val": 30, "test": 20},
        "group_counts": {"test": {"sex": {"F": 11, "M": 12, "unknown": None}},
                         "train": {"sex": {"F": 70, "M": 73, "unknown": None}}},
        "dataset_fingerprint": {"fingerprint": "f" * 64, "n_cases": 200, "n_subjects": 100,
                                "spacing_known": spacing_known,
                                "labels": {"anterior": {"voxel_fraction": 0.01, "cases": 200}}},
        "dvc_hash": "d41d8cd98f00b204", "source_model": "models:/hippo/3", "source_run_id": "trainrun9",
    }
    return CardInputs(**(values | overrides))


def _section_text(markdown: str, title: str) -> str:
    """The Markdown of one section (from its heading to the next ``##`` heading)."""
    return markdown.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_every_section_in_every_format_in_order(tmp_path: Path) -> None:
    card = build_card(_inputs(tmp_path))
    assert list(card) == list(SECTIONS)
    markdown, page = render_markdown(card), render_html(card)
    headings = re.findall(r"^## (.+)$", markdown, flags=re.M)
    assert headings == list(SECTIONS.values())
    assert re.findall(r"<h2>(.+?)</h2>", page) == list(SECTIONS.values())
    json.dumps(card, allow_nan=False)  # strict JSON: NaN became null


def test_json_keeps_the_exact_numbers(tmp_path: Path) -> None:
    card = build_card(_inputs(tmp_path))
    rows = {row["metric"]: row for row in card["quantitative_analyses"]["overall"]}
    assert set(rows) == {"dice/mean", "dice/anterior", "iou/mean", "hd95/mean", "assd/mean", "vol_err_ml/anterior"}
    for key, row in rows.items():
        for stat, suffix in [("mean", ""), ("median", "_median"), ("std", "_std"), ("ci_low", "_ci_low"),
                             ("ci_high", "_ci_high")]:
            expected = SUMMARY_MM[key + suffix]
            assert row[stat] == (None if expected != expected else expected), (key, stat)
    assert rows["hd95/mean"]["unit"] == "mm" and rows["vol_err_ml/anterior"]["unit"] == "ml"
    sex = card["quantitative_analyses"]["by_attribute"][0]
    report = _fairness()["attributes"][0]
    assert sex["groups"][:2] == report["groups"][:2]
    assert sex["dice_gap"] == report["dice_gap"] and sex["dice_ratio"] == report["dice_ratio"]
    assert sex["gap_exceeds_threshold"] is True
    assert card["quantitative_analyses"]["by_attribute"][1]["gap_exceeds_threshold"] is False
    assert card["quantitative_analyses"]["n_cases"] == 20.0


def test_markdown_and_html_show_the_numbers(tmp_path: Path) -> None:
    card = build_card(_inputs(tmp_path))
    markdown, page = render_markdown(card), render_html(card)
    for text in (markdown, page):
        assert "0.823" in text and "[0.801, 0.841]" in text  # overall Dice and its CI
        assert "0.771 [0.740, 0.802]" in text and "0.088 [0.046, 0.130]" in text  # worst group, gap
        assert "n/a" in text  # ASSD was not measurable
        assert "abc1234 (uncommitted changes)" in text and "models:/hippo/3" in text and "trainrun9" in text
        assert "timm / Hugging Face ImageNet weights" in text
        assert "age, binned at 0, 40, 60, 120" in text
        assert "d41d8cd98f00b204" in text and "f" * 64 in text
        assert "Validate locally first." in text and "Single-site data." in text
        assert "no patient identifiers" in text.lower()
    assert "alice" not in markdown  # only the dataset's folder and file name, never the full path
    assert "hippocampus/manifest.csv" in markdown


def test_generated_caveats_name_the_numbers(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, intended_use="")
    caveats = generated_caveats(inputs)
    joined = "\n".join(caveats)
    assert "sex: group 'unknown' has fewer than 10 cases and was not measured." in caveats
    gap = next(text for text in caveats if text.startswith("sex: mean Dice"))
    for number in ("0.771", "0.859", "0.088", "0.05", "[0.046, 0.130]", "95%", "'F'", "'M'", "excludes zero"):
        assert number in gap, number
    assert not any(text.startswith("age: mean Dice") for text in caveats)  # 0.02 is below the threshold
    assert "ethnicity" in joined and "not in the manifest" in joined
    assert "Only 20 evaluation cases" in joined and "30" in joined
    assert "intended use is not stated" in joined
    assert "pixels" not in joined  # spacing is known here
    card = build_card(inputs)
    assert card["caveats_and_recommendations"]["generated"] == caveats
    assert card["intended_use"]["primary_uses"].startswith("Not stated: fill in `model_card.intended_use`")
    markdown, page = render_markdown(card), render_html(card)
    for caveat in caveats:
        assert caveat in _section_text(markdown, "Caveats and recommendations")
    assert "Trained on one scanner vendor." in markdown
    assert "fewer than 10 cases and was not measured" in page and "excludes zero" in page


def test_gap_whose_interval_includes_zero_says_so(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    inputs.fairness["attributes"][0]["dice_gap"] = {"mean": 0.0876, "ci_low": -0.01, "ci_high": 0.19}
    gap = next(text for text in generated_caveats(inputs) if text.startswith("sex: mean Dice"))
    assert "includes zero" in gap


def test_enough_cases_and_stated_use_give_no_such_caveats(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, summary=SUMMARY_MM | {"n_cases": 40.0})
    joined = "\n".join(generated_caveats(inputs))
    assert "evaluation cases" not in joined and "intended use" not in joined
    assert build_card(inputs)["intended_use"]["primary_uses"] == "Research on hippocampus volumetry in adults."


@pytest.mark.parametrize("leak", [False, True])
def test_too_small_group_gets_no_number(tmp_path: Path, leak: bool) -> None:
    inputs = _inputs(tmp_path)
    if leak:  # even a report that carries numbers for a too-small group must not get them printed
        leaked = {"n": 7, "dice": {"mean": 0.4321, "ci_low": 0.3, "ci_high": 0.5}, "hd95": 9.87}
        inputs.fairness["attributes"][0]["groups"][2] |= leaked
    card = build_card(inputs)
    assert card["quantitative_analyses"]["by_attribute"][0]["groups"][2] == {"group": "unknown", "n": None,
                                                                            "measured": False}
    markdown, page = render_markdown(card), render_html(card)
    assert "too small to measure (< 10 cases)" in markdown
    lines = [line for line in markdown.splitlines() + page.splitlines() if "unknown" in line]
    assert len(lines) >= 8  # caveat, rows of evaluation and training counts and of the group table, twice
    for line in lines:
        assert not re.search(r"\d", re.sub(r"(<|&lt;|fewer than) 10", "", line)), line
    assert "0.432" not in markdown + page and "9.87" not in markdown + page and "0.4321" not in json.dumps(card)


def test_unknown_spacing_reports_pixels_never_mm(tmp_path: Path) -> None:
    summary = {"dice/mean": 0.9, "hd95_px/mean": 3.5, "hd95_px/mean_ci_low": 3.0, "hd95_px/mean_ci_high": 4.0,
               "assd_px/mean": 1.2, "vol_err_vox/anterior": -12.0, "vol_pred_vox/anterior": 300.0, "n_cases": 40.0}
    inputs = _inputs(tmp_path, summary=summary, spacing_known=False)
    for group in inputs.fairness["attributes"][0]["groups"][:2] + inputs.fairness["attributes"][1]["groups"]:
        group["distance_unit"] = "px"
    caveats = generated_caveats(inputs)
    assert any("pixels" in text for text in caveats)
    card = build_card(inputs)
    assert card["metrics"]["distance_unit"] == "pixels" and card["metrics"]["volume_unit"] == "voxels"
    units = {row["metric"]: row["unit"] for row in card["quantitative_analyses"]["overall"]}
    assert units == {"dice/mean": "", "hd95_px/mean": "pixels", "assd_px/mean": "pixels",
                     "vol_err_vox/anterior": "voxels", "vol_pred_vox/anterior": "voxels"}
    for text in (render_markdown(card), render_html(card), json.dumps(card)):
        assert not re.search(r"\b(mm|ml)\b", text)
        assert "HD95 (pixels)" in text or '"distance_unit": "pixels"' in text
    assert "3.500" in render_markdown(card)


def test_mm_units_when_spacing_known(tmp_path: Path) -> None:
    markdown = render_markdown(build_card(_inputs(tmp_path)))
    assert "HD95 (mm)" in markdown and "in mm" in markdown and "in ml" in markdown
    assert "pixels" not in _section_text(markdown, "Metrics")


def test_no_fairness_attributes_and_no_metrics(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, fairness={"attributes": []}, group_counts={}, summary={})
    inputs.config.fairness = FairnessConfig()
    card = build_card(inputs)
    markdown = render_markdown(card)
    assert "No patient attributes were configured" in _section_text(markdown, "Factors")
    assert card["quantitative_analyses"]["by_attribute"] == []
    assert not any(item["metric"].startswith("Fairness") for item in card["metrics"]["definitions"])
    assert not [text for text in generated_caveats(inputs) if text.startswith(("sex", "ethnicity"))]
    assert "No aggregate metrics were computed." in markdown and "Only 20 evaluation cases" in markdown  # split count


def test_training_card_names_the_run_not_a_source_model(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, kind="training", source_model=None, source_run_id=None, evaluation_split="val",
                     git_dirty=False)
    card = build_card(inputs)
    assert card["model_details"]["kind"] == "training run" and card["model_details"]["version"] == "run123"
    markdown = render_markdown(card)
    assert "Evaluated model" not in markdown and "uncommitted" not in markdown
    assert "Split**: val" in markdown


def test_write_card_writes_three_files(tmp_path: Path) -> None:
    card = build_card(_inputs(tmp_path))
    paths = write_card(card, tmp_path / "card")
    assert [path.name for path in paths] == ["model_card.json", "model_card.md", "model_card.html"]
    assert json.loads(paths[0].read_text()) == card
    assert paths[1].read_text() == render_markdown(card)
    page = paths[2].read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<head>" in page and "<style>" in page and '<meta charset="utf-8">' in page and "<body>" in page
    assert "<script" not in page  # standalone: nothing fetched by the iframe; the plots are inline PNGs
    assert "http" not in re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', "", page)
    assert re.findall(r'<img src="data:image/png;base64,', page) == ['<img src="data:image/png;base64,'] * 2
    assert "<code>model_card.intended_use</code>" not in page  # stated here; the HTML turns `code` into <code>
    assert "<code>resnet18</code>" in page


def test_input_is_not_modified(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    before = copy.deepcopy(inputs.fairness)
    build_card(inputs)
    assert inputs.fairness == before


def test_run_description_digest_names_gaps_and_caveats_within_mlflow_limits(tmp_path: Path) -> None:
    card = build_card(_inputs(tmp_path))
    digest = render_summary(card)
    assert digest.startswith("### Model card: ") and "model_card/model_card.html" in digest
    assert "| dice/mean | 0.823 [0.801, 0.841] |" in digest and "| hd95/mean (mm) | 2.345" in digest
    sex = card["quantitative_analyses"]["by_attribute"][0]
    assert f"| sex | {sex['worst_group']} | {fmt_estimate(sex['dice_gap'])} |" in digest
    assert all(caveat in digest for caveat in card["caveats_and_recommendations"]["generated"])
    inputs = _inputs(tmp_path)
    inputs.config.model_card.caveats = [f"caveat {i}: " + "x" * 200 for i in range(60)]
    long = render_summary(build_card(inputs))
    assert len(long) <= DESCRIPTION_LIMIT and long.endswith("(more in the full card)\n")


def test_the_card_says_whether_the_uncertainty_ranks_the_cases(tmp_path: Path) -> None:
    summary = {**SUMMARY_MM, "uncertainty/entropy_structure": 0.12, "uncertainty/entropy_structure/spearman": -0.61,
               "uncertainty/entropy_structure/aurc": 0.081, "uncertainty/entropy_structure/aurc_oracle": 0.052,
               "uncertainty/entropy_structure/aurc_random": 0.117, "uncertainty/entropy_structure/n": 40.0}
    card = build_card(_inputs(tmp_path, summary=summary))
    overall = [row["metric"] for row in card["quantitative_analyses"]["overall"]]
    assert "uncertainty/entropy_structure" in overall and not any(m.endswith("/spearman") for m in overall)
    assert card["quantitative_analyses"]["uncertainty_ranking"] == [
        {"score": "entropy_structure", "spearman": -0.61, "aurc": 0.081, "aurc_oracle": 0.052, "aurc_random": 0.117,
         "n": 40.0}]
    markdown = render_markdown(card)
    assert "### Uncertainty: do the uncertain cases have the poor segmentations?" in markdown
    assert "| `entropy_structure` | 40 | -0.610 | 0.081 | 0.052 | 0.117 |" in markdown
    assert "Uncertainty: do the uncertain cases" in render_html(card)
    assert "uncertainty" not in render_markdown(build_card(_inputs(tmp_path)))  # no scores, no section


def test_the_card_shows_calibration_overall_and_per_group(tmp_path: Path) -> None:
    summary = {**SUMMARY_MM, "calibration/ece": 0.042, "calibration/sex/F/ece": 0.061, "calibration/sex/M/ece": 0.03,
               "calibration/sex/ece_gap": 0.031}
    card = build_card(_inputs(tmp_path, summary=summary))
    assert not any(row["metric"].startswith("calibration/") for row in card["quantitative_analyses"]["overall"])
    markdown = render_markdown(card)
    assert "Expected calibration error 0.042" in markdown and "| sex | F | 0.061 |" in markdown
    assert "Largest minus smallest group ECE: sex 0.031" in markdown
    assert "Calibration" not in render_markdown(build_card(_inputs(tmp_path)))


def test_html_card_shows_a_plot_per_measured_attribute_and_markdown_none(tmp_path: Path) -> None:
    card = build_card(_inputs(tmp_path))
    page, markdown = render_html(card), render_markdown(card)
    alts = re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="([^"]+)">', page)
    assert alts == ["sex: mean Dice per group with its 95% bootstrap interval",
                    "age: mean Dice per group with its 95% bootstrap interval"]  # ethnicity is not available
    quantitative = page.split('<section id="quantitative_analyses">', 1)[1].split("</section>", 1)[0]
    assert quantitative.index("<h3>By sex</h3>") < quantitative.index('alt="sex:') < quantitative.index("By age")
    assert "<img" not in markdown and "data:image" not in markdown
