"""Model cards as Markdown and as a standalone HTML page, from the JSON card that ``modelcard.build_card`` makes.

Both renderers walk one layout (a list of paragraph, heading, list and table blocks per section), so the
Markdown and the HTML always say the same thing. The MLflow artifact viewer renders ``.html`` but shows ``.md``
as plain text; the run description (``mlflow.note.content``) renders Markdown.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Any

from medseg_lightning.reporting.model_card import SECTIONS, Block, fmt, fmt_count, fmt_edge, fmt_estimate, fmt_percent


def render_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown: one ``##`` heading per section, tables for the numbers."""
    lines = [f"# Model card: {_title(card)}", ""]
    for key, title in SECTIONS.items():
        lines += [f"## {title}", ""]
        for block in _LAYOUT[key](card):
            if block[0] == "table":
                header, rows = block[1], block[2]
                lines += [_md_row(header), "|" + " --- |" * len(header), *(_md_row(row) for row in rows)]
            elif block[0] == "plot":  # the table above holds its numbers; the picture is in the HTML card
                continue
            else:
                lines += {"p": [block[1]], "h3": [f"### {block[1]}"], "ul": [f"- {x}" for x in block[1]]}[block[0]]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render_html(card: dict[str, Any]) -> str:
    """The card as a standalone HTML page with inline CSS (no external resources, so it renders in an iframe)."""
    body = [f"<h1>Model card: {_inline(_title(card))}</h1>"]
    for key, title in SECTIONS.items():
        body.append(f'<section id="{key}">\n<h2>{html.escape(title)}</h2>')
        for block in _LAYOUT[key](card):
            if block[0] == "table":
                body.append("<table>\n<tr>" + "".join(f"<th>{_inline(cell)}</th>" for cell in block[1]) + "</tr>")
                body += ["<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>" for row in block[2]]
                body.append("</table>")
            elif block[0] == "ul":
                body.append("<ul>\n" + "\n".join(f"<li>{_inline(item)}</li>" for item in block[1]) + "\n</ul>")
            elif block[0] == "plot":
                body.append(_html_plot(*block[1:]))
            else:
                body.append(f"<{block[0]}>{_inline(block[1])}</{block[0]}>")
        body.append("</section>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Model card: '
            f"{html.escape(_title(card))}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body)
            + "\n</body>\n</html>\n")


def _html_plot(audit: dict[str, Any], confidence: float, minimum: int) -> str:
    """The attribute's per-group plot as an inline PNG (a data URI), so the page stays standalone."""
    from medseg_lightning.reporting.plots import close, fairness_figure

    buffer = io.BytesIO()
    figure = fairness_figure(audit, confidence, minimum)
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    caption = f"{audit['attribute']}: mean Dice per group with its {fmt_percent(confidence)} bootstrap interval"
    return (f'<figure class="group-plot"><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_card(card: dict[str, Any], folder: Path) -> list[Path]:
    """Writes ``model_card.json``, ``model_card.md`` and ``model_card.html`` into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = {"json": json.dumps(card, indent=2, allow_nan=False) + "\n", "md": render_markdown(card),
             "html": render_html(card)}
    paths = []
    for suffix, text in texts.items():
        path = folder / f"model_card.{suffix}"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def _layout_details(card: dict[str, Any]) -> list[Block]:
    d = card["model_details"]
    git = (d["git_commit"] or "unknown") + (" (uncommitted changes)" if d["git_dirty"] else "")
    channels = ", ".join(d["input_channels"]) + (f"; 2.5D: {d['slice_context']} neighbouring slice(s) on each side "
                                                 "stacked as channels" if d["slice_context"] else "")
    size = "×".join(map(str, d["target_size"])) if d["target_size"] else "native size"
    facts = [("Name", d["name"]), ("Version", d["version"]), ("Kind", d["kind"]), ("Date", d["date"]),
             ("Description", d["description"]), ("Architecture", d["architecture"]), ("Encoder", f"`{d['encoder']}`"),
             ("Pretrained weights", d["pretrained_source"]), ("Input channels (modalities)", channels),
             ("Classes", ", ".join(f"{label} = {name}" for label, name in d["classes"].items())),
             ("Slicing axis", d["slicing_axis"]), ("Target size", size),
             ("medseg-lightning version", d["medseg_lightning_version"]), ("Git commit", git),
             ("Licence", d["license"]), ("Owners", ", ".join(d["owners"]) or "not stated"),
             ("MLflow run id", f"`{d['mlflow_run_id']}`"), ("Evaluated model", d["evaluated_model"]),
             ("Run that trained the model", d["source_run_id"])]
    return [("ul", [f"**{label}**: {value}" for label, value in facts if value not in (None, "")])]


def _layout_intended_use(card: dict[str, Any]) -> list[Block]:
    section = card["intended_use"]
    out_of_scope = section["out_of_scope_uses"]
    return [("p", section["primary_uses"]), ("h3", "Out-of-scope uses"),
            ("ul", out_of_scope) if out_of_scope else ("p", "None stated.")]


def _layout_factors(card: dict[str, Any]) -> list[Block]:
    section = card["factors"]
    if not section["attributes"]:
        return [("p", "No patient attributes were configured for auditing (`fairness.attributes` is empty), so "
                      "performance is not disaggregated by group.")]
    items = [a["attribute"] + (f", binned at {', '.join(map(fmt_edge, a['bins']))}" if a["bins"] else "")
             + (f" (not available: {a['note']})" if a["available"] is False else "") for a in section["attributes"]]
    return [("p", "Performance is disaggregated by these patient attributes:"), ("ul", items),
            ("p", f"Missing values form the group `{section['missing_value_group']}`, reported like any other group. "
                  f"Groups with fewer than {section['min_group_size']} cases are too small to measure.")]


def _layout_metrics(card: dict[str, Any]) -> list[Block]:
    section = card["metrics"]
    return [("ul", [f"**{item['metric']}**: {item['definition']}" for item in section["definitions"]]),
            ("p", f"**Empty masks**: {section['empty_masks']}")]


def _layout_evaluation(card: dict[str, Any]) -> list[Block]:
    s = card["evaluation_data"]
    facts = [f"**Split**: {s['split']}", f"**Cases**: {fmt_count(s['n_cases'])}",
             f"**Dataset fingerprint** (sha256): `{s['dataset_fingerprint'] or 'unknown'}`"]
    facts += [f"**DVC hash**: `{s['dvc_hash']}`"] if s["dvc_hash"] else []
    looks = s.get("test_looks")
    if looks:
        facts.append(f"**Test looks**: this test split has been evaluated {looks['evaluations']} time(s) by "
                     f"{looks['configurations']} distinct configuration(s), this one included")
    return [("ul", facts), *_count_table(s["group_counts"], s["min_group_size"])]


def _layout_training(card: dict[str, Any]) -> list[Block]:
    s = card["training_data"]
    spacing = {True: "known (distances in mm)", False: "unknown (distances in pixels)"}.get(s["spacing_known"], "n/a")
    facts = [f"**Source**: {s['source']}",
             f"**Dataset fingerprint** (sha256): `{s['dataset_fingerprint'] or 'unknown'}`",
             f"**Cases**: {fmt_count(s['n_cases'])}, **subjects**: {fmt_count(s['n_subjects'])} "
             "(splits are by subject)",
             f"**Voxel spacing**: {spacing}"] + ([f"**DVC hash**: `{s['dvc_hash']}`"] if s["dvc_hash"] else [])
    blocks: list[Block] = [("ul", facts), ("table", ["Split", "Cases"],
                                            [[name, fmt_count(n)] for name, n in s["split_counts"].items()])]
    if isinstance(s["labels"], dict) and s["labels"]:
        rows = [[name, fmt((stats or {}).get("voxel_fraction"), 4), fmt_count((stats or {}).get("cases"))]
                for name, stats in s["labels"].items()]
        blocks.append(("table", ["Class", "Share of voxels", "Cases containing it"], rows))
    blocks += _count_table(s["group_counts"], s["min_group_size"], "Training cases per group")
    folds = (card["quantitative_analyses"].get("cross_validation") or {}).get("train_group_counts")
    return blocks + (_fold_count_table(folds, s["min_group_size"]) if folds else [])


def _fold_count_table(folds: dict[str, dict[str, dict[str, int | None]]], minimum: int) -> list[Block]:
    """Training cases per group in every fold of a cross-validation (each case trains in all folds but its own)."""
    names = list(folds)
    keys = list(dict.fromkeys((attribute, group) for counts in folds.values() for attribute, groups in counts.items()
                              for group in groups))
    rows = [[attribute, group, *(_count(folds[fold].get(attribute, {}).get(group, 0), minimum) for fold in names)]
            for attribute, group in keys]
    return [("h3", "Training cases per group, by fold"),
            ("table", ["Attribute", "Group", *(f"Fold {fold}" for fold in names)], rows)]


def _count(n: int | None, minimum: int) -> str:
    return fmt_count(n) if n is not None else f"< {minimum}"


def _layout_quantitative(card: dict[str, Any]) -> list[Block]:
    s = card["quantitative_analyses"]
    level = fmt_percent(s["confidence"])
    rows = [[f"`{r['metric']}`", r["unit"], fmt(r["mean"]), fmt(r["median"]), fmt(r["std"]),
             f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"] for r in s["overall"]]
    blocks: list[Block] = [("p", f"Split `{s['split']}`, {fmt_count(s['n_cases'])} cases; intervals are {level} "
                                 "percentile-bootstrap intervals of the mean over cases."), ("h3", "Overall"),
                           ("table", ["Metric", "Unit", "Mean", "Median", "Std", f"{level} CI"], rows) if rows
                           else ("p", "No aggregate metrics were computed.")]
    for audit in s["by_attribute"]:
        blocks.append(("h3", f"By {audit['attribute']}"))
        if not audit.get("available", True):
            blocks.append(("p", f"Not available: {audit.get('note') or 'no reason given'}."))
            continue
        blocks += _group_blocks(audit, s["min_group_size"], s["confidence"], s["distance_unit"])
    return (blocks + _calibration_blocks(s.get("calibration")) + _saliency_blocks(s.get("saliency"))
            + _uncertainty_blocks(s.get("uncertainty_ranking"))
            + _repeats_blocks(s.get("repeats"))
            + _cross_validation_blocks(s.get("cross_validation")) + _cross_site_blocks(s.get("cross_site"), level))


def _calibration_blocks(calibration: dict[str, Any] | None) -> list[Block]:
    if not calibration:
        return []
    blocks: list[Block] = [
        ("h3", "Calibration"),
        ("p", f"Expected calibration error {fmt(calibration['ece'])}: the voxel-weighted mean gap between the softmax "
              "confidence and the fraction of voxels right, over the voxels that the prediction or the reference "
              "calls foreground (0 is perfectly calibrated; the reliability diagram is a report file).")]
    if calibration.get("temperature"):
        blocks.append(("p", f"The logits are divided by a softmax temperature of {calibration['temperature']:.3g}, "
                            "fitted on the validation split by `medseg calibrate` (labels of a single model do not "
                            "change; its confidences do)."))
    if calibration["groups"]:
        rows = [[g["attribute"], g["group"], fmt(g["ece"])] for g in calibration["groups"]]
        gaps = ", ".join(f"{name} {fmt(gap)}" for name, gap in calibration["gaps"].items())
        blocks += [("table", ["Attribute", "Group", "ECE"], rows)]
        if gaps:
            blocks.append(("p", f"Largest minus smallest group ECE: {gaps}. A model that is confident and wrong "
                                "more often for one group misleads its readers more for that group."))
    return blocks


def _saliency_blocks(saliency: dict[str, Any] | None) -> list[Block]:
    if not saliency:
        return []
    methods = " and ".join(method.replace("_", " ") for method in saliency["methods"])
    return [("h3", "Saliency"),
            ("p", f"`{saliency['figure']}` in the run's artifacts shows {methods} maps (captum) for "
                  f"{'; '.join(saliency['cases'])}: which pixels raised the logit of the explained region. Grad-CAM "
                  "passes the weight-randomisation check (its maps change when the weights are randomised); "
                  "integrated gradients did not on the hippocampus model (its maps stay nearly the same), so it "
                  "shows the architecture more than what was learnt. A map shows where the model looked, not why "
                  "it is right.")]


def _uncertainty_blocks(ranking: list[dict[str, Any]] | None) -> list[Block]:
    if not ranking:
        return []
    rows = [[f"`{r['score']}`", fmt_count(r["n"]), fmt(r["spearman"]), fmt(r["aurc"]), fmt(r["aurc_oracle"]),
             fmt(r["aurc_random"])] for r in ranking]
    return [("h3", "Uncertainty: do the uncertain cases have the poor segmentations?"),
            ("p", "Each score ranks the cases from most to least certain. Spearman: its rank correlation with the "
                  "case's Dice (a useful score is clearly negative). AURC: the area under the risk-coverage curve "
                  "(1 - mean Dice of the most certain cases, averaged over how many are kept; lower is better), "
                  "between the oracle (cases ranked by their true Dice) and random ranking. A score near random "
                  "should not be used to decide which cases a person reviews."),
            ("table", ["Score", "Cases", "Spearman", "AURC", "AURC oracle", "AURC random"], rows)]


def _repeats_blocks(study: dict[str, Any] | None) -> list[Block]:
    if not study:
        return []
    rows = [[str(seed), fmt(study["dice"].get(str(seed))), f"`{study['runs'][str(seed)]}`"] for seed in study["seeds"]]
    folds = f", each a {study['n_folds']}-fold cross-validation" if study.get("n_folds") else ""
    return [("h3", "Repeats over seeds"),
            ("p", f"{len(study['seeds'])} trainings with different seeds{folds}. The numbers above average each "
                  f"case's metrics over the seeds; over seeds, the mean Dice is {fmt(study['dice_mean'])} with a "
                  f"standard deviation of {fmt(study['dice_std'])} (how much a rerun moves it)."),
            ("table", ["Seed", f"{study['split'].capitalize()} Dice", "MLflow run"], rows)]


def _cross_validation_blocks(study: dict[str, Any] | None) -> list[Block]:
    if not study:
        return []
    rows = [[str(f["fold"]), fmt_count(f["n_train"]), fmt_count(f["n_val"]), fmt_count(f["n_test"]), fmt(f["dice"]),
             f"`{f['run_id']}`"] for f in study["folds"]]
    return [("h3", "Cross-validation folds"),
            ("p", f"{study['n_folds']} folds by patient; every case was tested once, by the model of the fold that "
                  "held it out, and the numbers above pool those predictions. Mean Dice per fold: "
                  f"{fmt(study['dice_fold_mean'])} (standard deviation over folds {fmt(study['dice_fold_std'])})."),
            ("table", ["Fold", "Train", "Val", "Test", "Test Dice", "MLflow run"], rows)]


def _cross_site_blocks(study: dict[str, Any] | None, level: str) -> list[Block]:
    if not study:
        return []
    attribute = study["attribute"]
    rows = [[g["group"], fmt_count(g["n"]), fmt_estimate(g["dice_in"]), fmt_estimate(g["dice_out"]),
             fmt_estimate(g["dice_drop"]), f"`{g['run_id']}`"] for g in study["groups"]]
    blocks: list[Block] = [
        ("h3", f"Cross-{attribute} generalisation"),
        ("p", f"Dice of each {attribute}'s cases when the {attribute} was seen in training (the pooled "
              f"cross-validation above) and when it was not (a model trained and validated on the other "
              f"{attribute}s' cases only); drop = seen − unseen, paired per case, with a {level} bootstrap interval."),
        ("table", [attribute.capitalize(), "Cases", f"Dice seen [{level} CI]", f"Dice unseen [{level} CI]",
                   "Drop [CI]", "MLflow run (unseen)"], rows)]
    if study.get("not_measured"):
        blocks.append(("ul", [f"{item['group']}: not held out ({item['reason']})" for item in study["not_measured"]]))
    return blocks


def _group_blocks(audit: dict[str, Any], minimum: int, confidence: float, distance: str) -> list[Block]:
    level = fmt_percent(confidence)
    measured = [group for group in audit["groups"] if group.get("measured")]
    classes = list(dict.fromkeys(name for group in measured for name in group.get("dice_per_class") or {}))
    unit = {"px": "pixels"}.get(measured[0].get("distance_unit"), measured[0].get("distance_unit")) if measured else ""
    header = ["Group", "Cases", f"Dice mean [{level} CI]", *(f"Dice {name}" for name in classes),
              f"HD95 ({unit or distance})"]
    rows = []
    for group in audit["groups"]:
        if not group.get("measured"):
            rows.append([group["group"], f"too small to measure (< {minimum} cases)", *["–"] * (len(header) - 2)])
            continue
        per_class = group.get("dice_per_class") or {}
        rows.append([group["group"], fmt_count(group.get("n")), fmt_estimate(group.get("dice")),
                     *(fmt_estimate(per_class.get(name)) for name in classes), fmt(group.get("hd95"))])
    notes = []
    if audit.get("dice_gap"):
        gap = audit["dice_gap"]
        flag = " — **above the gap threshold**" if audit.get("gap_exceeds_threshold") else ""
        notes += [f"Worst group: '{audit['worst_group']}' (mean Dice {fmt(audit['dice_worst'])}); best group: "
                  f"'{audit['best_group']}' ({fmt(audit['dice_best'])})",
                  f"Gap (best − worst): {fmt_estimate(gap)}{flag}",
                  f"Ratio (worst / best): {fmt(audit.get('dice_ratio'))}"]
    notes += [f"Note: {audit['note']}"] if audit.get("note") else []
    plot = [("plot", audit, confidence, minimum)] if measured else []
    return [("table", header, rows), *([("ul", notes)] if notes else []), *plot]


def _layout_ethics(card: dict[str, Any]) -> list[Block]:
    section = card["ethical_considerations"]
    return [("ul", section["stated"] + section["standard"])]


def _layout_caveats(card: dict[str, Any]) -> list[Block]:
    section = card["caveats_and_recommendations"]
    caveats, recommendations = section["generated"] + section["stated"], section["recommendations"]
    return [("h3", "Caveats"), ("ul", caveats) if caveats else ("p", "None identified."),
            ("h3", "Recommendations"), ("ul", recommendations) if recommendations else ("p", "None stated.")]


_LAYOUT = {"model_details": _layout_details, "intended_use": _layout_intended_use, "factors": _layout_factors,
           "metrics": _layout_metrics, "evaluation_data": _layout_evaluation, "training_data": _layout_training,
           "quantitative_analyses": _layout_quantitative, "ethical_considerations": _layout_ethics,
           "caveats_and_recommendations": _layout_caveats}


_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:70rem;margin:1.5rem auto;padding:0 1rem;"
    "color:#1f2328;line-height:1.45}h1{font-size:1.6rem}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2rem;"
    "margin-top:1.8rem}h3{font-size:1.05rem}table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}"
    "th,td{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:left}th{background:#f6f8fa}"
    "code{background:#f6f8fa;padding:0 .2rem;border-radius:3px;font-size:.85em}"
    "#caveats_and_recommendations li{margin-bottom:.3rem}figure.group-plot{margin:.6rem 0}"
    "figure.group-plot img{max-width:100%}figcaption{font-size:.85rem;color:#57606a}"
)


def _count_table(counts: dict[str, dict[str, int | None]], minimum: int, title: str = "Cases per group") -> list[Block]:
    rows = [[attribute, group, _count(n, minimum)]
            for attribute, groups in counts.items() for group, n in groups.items()]
    return [("h3", title), ("table", ["Attribute", "Group", "Cases"], rows)] if rows else []


def _title(card: dict[str, Any]) -> str:
    details = card["model_details"]
    return f"{details['name']} (version {details['version']}, {details['kind']})"


def _md_row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def _inline(text: Any) -> str:
    """Escaped HTML with the two Markdown spans the layout uses: `code` and **bold**."""
    escaped = html.escape(str(text), quote=False)  # text nodes only: quotes need no escaping
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


DESCRIPTION_LIMIT = 7900  # MLflow truncates tag values (the run description) at 8000 characters


def render_summary(card: dict[str, Any]) -> str:
    """A short Markdown digest for the MLflow run description: headline metrics, fairness gaps and caveats.

    The full card does not fit in a run description, so this names where it is.
    """
    quantitative = card["quantitative_analyses"]
    details = card["model_details"]
    lines = [f"### Model card: {_title(card)}", "",
             f"{details['architecture']} / {details['encoder']}, evaluated on the {quantitative['split']} split "
             f"({fmt_count(quantitative['n_cases'])} cases). Full card: artifacts `model_card/model_card.html` "
             "(also `.md`, `.json`).", "",
             f"| Metric | Mean [{fmt_percent(quantitative['confidence'])} CI] |", "| --- | --- |"]
    for row in quantitative["overall"]:
        if row["metric"].split("/")[0] in ("dice", "hd95", "hd95_px"):
            unit = f" ({row['unit']})" if row["unit"] else ""
            lines.append(f"| {row['metric']}{unit} | {fmt_estimate(row)} |")
    audits = [item for item in quantitative["by_attribute"] if item.get("available")]
    if audits:
        lines += ["", "| Attribute | Worst group | Dice gap [CI] | Worst / best |", "| --- | --- | --- | --- |"]
        lines += [f"| {item['attribute']} | {item.get('worst_group') or 'n/a'} | {fmt_estimate(item.get('dice_gap'))}"
                  f" | {fmt(item.get('dice_ratio'))} |" for item in audits]
    caveats = card["caveats_and_recommendations"]
    notes = [*caveats["generated"], *caveats["stated"]]
    if notes:
        lines += ["", "**Caveats**", *(f"- {note}" for note in notes)]
    text = "\n".join(lines) + "\n"
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 40].rsplit("\n", 1)[0] + \
        "\n- ... (more in the full card)\n"
