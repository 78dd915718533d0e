"""The eval report: a Table-1-like Markdown table, the quality-against-NFE plot and a static HTML gallery.

Everything reads the `results.json` structure the eval stage writes (`results["models"][j]` holds label, kind,
effective_nfe, timings, metrics, sample files; in the toy suite also `splits`, metrics per caption split, and
`readings`, what the analyzer saw in each clip). The toy table has one row per model and split. matplotlib comes
from the `plot` extra and is imported only to plot; without it the report is complete but for the PNG, and
report.md says so (PLOT_MISSING_NOTE), so a plain install's first run never fails on a plotting library.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from urllib.parse import quote

from tmdcli.evaluation.metrics import METRICS
from tmdcli.evaluation.toy import PLOT_METRICS as TOY_PLOT_METRICS
from tmdcli.evaluation.toy import SPLITS, TABLE_METRICS, TOY_METRICS
from tmdcli.optional import available, install_hint, require

VBENCH_COLUMNS = {"total": "VBench Total", "quality": "Quality", "semantic": "Semantic"}
QUICK_PLOT_METRICS = ("frechet_pixel_stats", "seed_diversity_pixels", "frame_consistency_pixels", "flicker_abs_diff",
                      "clip_score", "toy_adherence")
GALLERY_MAX_PROMPTS = 50  # a page with thousands of <video> elements helps nobody


PLOT_FILE = "quality_vs_nfe.png"
PLOT_MISSING_NOTE = (f"{PLOT_FILE} not drawn: matplotlib is not installed ({install_hint('plot')} adds it; "
                     f"rerun the same tmd eval to draw it)")


SCREENSHOT_FILE = "gallery.png"  # gallery.html as headless Chromium renders it (evaluation/browser.py)


def can_plot() -> bool:
    """Whether quality_vs_nfe.png can be drawn here (matplotlib is optional: the `plot` extra)."""
    return available("matplotlib")


# --------------------------------------------------------------------------------------------------------------
# Table


def metric_columns(results: dict) -> list[tuple[str, str]]:
    """(key, header) of each metric column, in a fixed order; only metrics some model has."""
    if results["suite"] == "vbench":
        present = {k for m in results["models"] for k in (m.get("vbench") or {}) if k in VBENCH_COLUMNS}
        return [(k, h) for k, h in VBENCH_COLUMNS.items() if k in present]
    present = {k for m in results["models"] for k, v in m["metrics"].items() if v is not None}
    if results["suite"] == "toy":
        return [(k, TOY_METRICS[k][0]) for k in TABLE_METRICS if k in present]
    return [(k, METRICS[k][0]) for k in METRICS if k in present]


def metric_definitions(results: dict) -> dict[str, tuple[str, str, str]]:
    return TOY_METRICS if results["suite"] == "toy" else METRICS


def model_value(model: dict, key: str, suite: str):
    if suite == "vbench":
        value = (model.get("vbench") or {}).get(key)
        return None if value is None else 100.0 * value  # papers print VBench scores x100
    return model["metrics"].get(key)


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _time_split(model: dict) -> str:
    t = model.get("timings") or {}
    n = max(int(t.get("num_videos", 0)), 1)
    return (f"{t['total_s'] / n:.3g} ({t['text_s'] / n:.2g} / {t['transformer_s'] / n:.3g} / "
            f"{t['vae_s'] / n:.2g})") if t.get("num_videos") else "-"


def _row_label(results: dict, j: int) -> str:
    m = results["models"][j]
    label = m["label"] + (" (ref)" if j == 0 and len(results["models"]) > 1 else "")
    return label + (" [mode collapse?]" if m.get("mode_collapse") else "")


def table_rows(results: dict, *, with_intervals: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows: model, kind, effective NFE, metrics, seconds per video split as text / DiT / VAE.

    The toy suite has a `split` column and one row per model and caption split (train: combinations seen in
    training, heldout: held out of it). `with_intervals` (report.md) adds each figure's 95% interval where
    results.json has one, `0.41 [0.3, 0.52]`, bold when it separates from the reference's (toy_cell).
    """
    columns = metric_columns(results)
    toy = results["suite"] == "toy"
    header = ["model"] + (["split"] if toy else []) + ["kind", "NFE"] + [h for _, h in columns]
    header.append("s/video (text / DiT / VAE)")
    if results["suite"] == "vbench":  # two decimals, as the papers print VBench x100
        fmt_metric = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    else:
        fmt_metric = fmt
    rows = []
    for j, m in enumerate(results["models"]):
        label, split = _row_label(results, j), _time_split(m)
        if toy:
            for name in [s for s in SPLITS if s in m.get("splits", {})]:
                cell = ((lambda k: toy_cell(results, j, name, k)) if with_intervals  # noqa: E731
                        else (lambda k: fmt_metric(m["splits"][name].get(k))))
                rows.append([label, name, m["kind"], fmt(m["effective_nfe"], 3)]
                            + [cell(k) for k, _ in columns] + [split])
            continue
        rows.append([label, m["kind"], fmt(m["effective_nfe"], 3)]
                    + [fmt_metric(model_value(m, k, results["suite"])) for k, _ in columns] + [split])
    return header, rows


def toy_cell(results: dict, j: int, split: str, key: str) -> str:
    """A toy figure with its 95% interval; bold when model j's interval separates from the reference's on the
    same split, the only case in which report.md calls it better or worse than the reference."""
    from tmdcli.evaluation.bootstrap import CI_SUFFIX, intervals_separate

    figures = results["models"][j]["splits"][split]
    value, ci = figures.get(key), figures.get(key + CI_SUFFIX)
    text = fmt(value)
    ref_ci = results["models"][0]["splits"].get(split, {}).get(key + CI_SUFFIX)
    if value is not None and j > 0 and intervals_separate(ci, ref_ci):
        text = f"**{text}**"
    return text if value is None or ci is None else f"{text} [{fmt(ci[0], 3)}, {fmt(ci[1], 3)}]"


ORDERING_KEYS = ("adherence", "frechet_analyzer_features", "frechet_pixel_features")  # per attribute: bold cells


def called_orderings(results: dict) -> list[str]:
    """'split, figure: A better than B' for every pair of distinct models whose 95% intervals separate, on the
    headline figures (ORDERING_KEYS; a table of a dozen models would otherwise list hundreds of pairs)."""
    from tmdcli.evaluation.bootstrap import CI_SUFFIX, intervals_separate

    models, lines = results["models"], []
    for split in SPLITS:
        for key in ORDERING_KEYS:
            name, better, _ = TOY_METRICS[key]
            for a in range(len(models)):
                for b in range(a + 1, len(models)):
                    fa, fb = (models[i].get("splits", {}).get(split, {}) for i in (a, b))
                    if models[a]["sample_dir"] == models[b]["sample_dir"] or not intervals_separate(
                            fa.get(key + CI_SUFFIX), fb.get(key + CI_SUFFIX)):
                        continue
                    a_wins = (fa[key] > fb[key]) == (better == "higher")
                    win, lose = (models[a], models[b]) if a_wins else (models[b], models[a])
                    lines.append(f"- {split}, {name}: {win['label']} better than {lose['label']}")
    return lines


def markdown_table(results: dict) -> str:
    header, rows = table_rows(results, with_intervals=True)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(results: dict) -> str:
    """The same table aligned for a terminal (`tmd eval` and `tmd show`)."""
    header, rows = table_rows(results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# --------------------------------------------------------------------------------------------------------------
# report.md


def report_markdown(results: dict, *, plotted: bool = True, screenshot_skipped: str | None = None) -> str:
    """report.md; `plotted=False` lists no quality_vs_nfe.png and says why (PLOT_MISSING_NOTE); likewise
    `screenshot_skipped`, the reason gallery.png was not taken (else the report shows it)."""
    s = results["settings"]
    vbench = results["suite"] == "vbench"
    title = {"vbench": "VBench", "toy": "toy world (analyzer metrics on toy-grammar captions)"}.get(
        results["suite"], "Offline VBench-style metrics (not VBench scores)")
    what = f"{s['num_prompts']} prompts"
    if results["suite"] == "toy":
        what = (f"{s['splits']['train']} train captions (combinations seen in training) + {s['splits']['heldout']} "
                f"held-out captions (combinations held out of training)")
    out = [f"# tmd eval: {title}", "",
           f"{what} x {s['samples_per_prompt']} samples, seeds `{s['seed_rule']}`, video "
           f"{'x'.join(map(str, s['video']))}, prompt list sha256 `{s['prompts_sha256'][:16]}`. "
           f"Every model sampled the same prompts with the same seeds. Reference (first model): "
           f"**{results['models'][0]['label']}**.", "", markdown_table(results), ""]
    if vbench:
        out += _vbench_section(results)
    else:
        out += ["## Metrics", ""]
        shown = {k for k, _ in metric_columns(results)}
        defs = metric_definitions(results)
        out += [f"- **{defs[k][0]}** (`{k}`, {defs[k][1]} is better): {defs[k][2]}." for k in defs if k in shown]
        if results["suite"] == "toy":
            out += [f"- `{k}` ({defs[k][1]} is better, results.json only): {defs[k][2]}." for k in defs
                    if k not in shown]
            out += ["", "Rows are per caption split; results.json also holds every metric over both splits "
                        "(`metrics`), per-caption adherence and what the analyzer read in each clip."]
            out += _interval_section(results)
        flagged = [m["label"] for m in results["models"] if m.get("mode_collapse")]
        if flagged:
            out += ["", f"Mode collapse flag (diversity ratio below {s['collapse_ratio']}): {', '.join(flagged)}."]
    out += ["", "NFE: effective transformer evaluations per sample (TMD Eq. 16; a teacher counts steps x 2 with CFG). "
                "Times are wall-clock per video at the batch size used, split into text encoder, transformer and "
                "VAE decode; each model's first batch includes one-off warm-up, so compare times over many batches.",
            "", f"Files: `results.json`, {f'`{PLOT_FILE}`, ' if plotted else ''}`gallery.html`, "
                f"{'' if screenshot_skipped else f'`{SCREENSHOT_FILE}`, '}`samples/`.", ""]
    if not plotted:
        out += [f"Note: {PLOT_MISSING_NOTE}.", ""]
    if screenshot_skipped:
        out += [f"Note: {SCREENSHOT_FILE} not taken: {screenshot_skipped}. Nothing else depends on it; the "
                f"gallery itself is complete.", ""]
    else:
        out += [f"![gallery.html as headless Chromium renders it]({SCREENSHOT_FILE})", ""]
    return "\n".join(out)


def _interval_section(results: dict) -> list[str]:
    """How the toy table's intervals are made, and the orderings they allow calling."""
    from tmdcli.evaluation.bootstrap import LEVEL, NUM_RESAMPLES

    calls = called_orderings(results)
    return ["", "## Intervals and orderings", "",
            f"Brackets: {LEVEL:.0%} interval by bootstrap over captions ({NUM_RESAMPLES} resamples with a fixed "
            "seed; all seeds of a caption drawn together; a Frechet distance resamples both models jointly, with "
            "the replicates' mean shifted onto the estimate). A bold figure's interval separates from the "
            "reference's on the same split. An ordering (adherence, Frechet) is called only when two models' "
            "intervals separate:", "",
            *(calls or ["- none: every pair of intervals overlaps"])]


def _vbench_section(results: dict) -> list[str]:
    dims = [d for d in results["settings"].get("dimensions", [])]
    out = ["## Raw dimension scores", "", "| model | " + " | ".join(dims) + " |", "|---|" + "---|" * len(dims)]
    for m in results["models"]:
        raw = (m.get("vbench") or {}).get("raw", {})
        out.append(f"| {m['label']} | " + " | ".join(fmt(raw.get(d)) for d in dims) + " |")
    s = results["settings"]
    notes = [f"{m['label']}: {note}" for m in results["models"] for note in m.get("notes", [])]
    if notes:
        out += ["", "Warnings: " + "; ".join(notes) + "."]
    out += ["", f"VBench {s.get('vbench_version')}, prompts {s.get('prompt_form')}, {s['fps']} fps. Scores use "
                "the min-max constants of VBench's scripts/constant.py; Total = (4 Quality + Semantic) / 5, x100."]
    return out


# --------------------------------------------------------------------------------------------------------------
# quality_vs_nfe.png


def plot_metrics(results: dict) -> list[tuple[str, str]]:
    if results["suite"] == "vbench":
        return metric_columns(results)
    present = dict(metric_columns(results))
    return [(k, present[k]) for k in QUICK_PLOT_METRICS if k in present]


def plot_quality_vs_nfe(results: dict, path: str | Path) -> Path:
    """One panel per headline metric against effective NFE (log x); the reference model is a dashed line."""
    matplotlib = require("matplotlib", extra="plot", purpose=f"drawing {PLOT_FILE}")
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    if results["suite"] == "toy":
        return _plot_toy(results, Path(path), plt)
    panels = plot_metrics(results) or [("effective_nfe", "NFE")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    models = results["models"]
    reference = models[0]
    for ax, (key, header) in zip(axes[0], panels):
        for j, m in enumerate(models):
            value = m["effective_nfe"] if key == "effective_nfe" else model_value(m, key, results["suite"])
            if value is None:
                continue
            ax.scatter([m["effective_nfe"]], [value], s=36, zorder=3, marker="*" if j == 0 else "o")
            ax.annotate(m["label"], (m["effective_nfe"], value), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        ref_value = model_value(reference, key, results["suite"]) if key != "effective_nfe" else None
        if key.startswith("frechet_"):
            ref_value = 0.0  # the reference's distance to itself
        if ref_value is not None:
            ax.axhline(ref_value, linestyle="--", color="gray", linewidth=1,
                       label=f"{reference['label']} (reference)")
            ax.legend(fontsize=7, loc="best")
        better = METRICS.get(key, ("", "higher"))[1] if results["suite"] != "vbench" else "higher"
        ax.set_title(f"{header} ({better} is better)", fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("effective NFE")
        ax.grid(True, alpha=0.3)
    fig.suptitle("quality vs effective NFE" + ("" if results["suite"] == "vbench" else " (offline, VBench-style)"),
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_toy(results: dict, path: Path, plt) -> Path:
    """Adherence (first panel), Frechet on analyzer features and seed diversity against effective NFE, one colour
    per caption split; a star marks the reference model, whose value is a dashed line (0 for a Frechet distance)."""
    Line2D, NullFormatter = plt.Line2D, plt.NullFormatter  # via pyplot: every matplotlib import sits behind require
    models, reference = results["models"], results["models"][0]
    panels = [k for k in TOY_PLOT_METRICS if any(m["metrics"].get(k) is not None for m in models)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    colours = {"train": "tab:blue", "heldout": "tab:orange"}
    nfes = sorted({m["effective_nfe"] for m in models})
    for ax, key in zip(axes[0], panels):
        frechet = key.startswith("frechet_")
        for split in SPLITS:
            for j, m in enumerate(models):
                value = m.get("splits", {}).get(split, {}).get(key)
                if value is None:
                    continue
                ax.scatter([m["effective_nfe"]], [value], s=60 if j == 0 else 36, zorder=3, color=colours[split],
                           marker="*" if j == 0 else "o")
                if split == "train":
                    ax.annotate(m["label"], (m["effective_nfe"], value), textcoords="offset points", xytext=(4, 4),
                                fontsize=7)
            ref = 0.0 if frechet else reference.get("splits", {}).get(split, {}).get(key)
            if ref is not None:
                ax.axhline(ref, linestyle="--", linewidth=1, color="gray" if frechet else colours[split], alpha=0.7)
        name, better, _ = TOY_METRICS[key]
        ax.set_title(f"{name} ({better} is better)", fontsize=9)
        if key == "adherence":
            ax.set_ylim(-0.03, 1.03)
        ax.set_xscale("log")
        ax.set_xticks(nfes, [fmt(n, 3) for n in nfes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("effective NFE")
        ax.grid(True, alpha=0.3)
        ax.legend(handles=[Line2D([], [], marker="o", linestyle="", color=c, label=f"{s} captions")
                           for s, c in colours.items()], fontsize=7, loc="best")
    fig.suptitle(f"toy world: quality vs effective NFE (star and dashed: {reference['label']}, the reference)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------
# gallery.html

_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;font-size:13px}
video{width:256px;image-rendering:pixelated;background:#000;display:block}
section{margin:1.5em 0}h3{font-size:15px;margin:.3em 0}.note{color:#666;font-size:12px}"""


def relative_video_path(sample_dir: str, name: str) -> str:
    """A URL relative to the artifact folder: each segment percent-encoded (prompts become file names)."""
    return "/".join(quote(part) for part in [*sample_dir.split("/"), name])


def gallery_html(results: dict, max_prompts: int = GALLERY_MAX_PROMPTS) -> str:
    """A static page, openable from disk: metrics table, then each prompt's clips side by side per model, same seed."""
    e = html.escape
    header, rows = table_rows(results)
    table = ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
    models = results["models"]
    prompts = results["prompts"][:max_prompts]
    kind = {"vbench": "VBench scores x100",
            "toy": "Toy-world analyzer metrics; under each clip, what the analyzer read (a tick when it matches the "
                   "caption)"}.get(results["suite"], "Offline VBench-style metrics, not VBench scores")
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>tmd eval {e(results.get('artifact_id', ''))}</title><style>{_CSS}</style></head><body>",
             f"<h1>tmd eval ({e(results['suite'])})</h1>",
             f"<p class=note>{kind}; reference model: {e(models[0]['label'])}; see report.md for definitions.</p>",
             table]
    if len(results["prompts"]) > max_prompts:
        parts.append(f"<p class=note>Showing the first {max_prompts} of {len(results['prompts'])} prompts; every "
                     f"clip is in samples/.</p>")
    for p, prompt in enumerate(prompts):
        split = f" <span class=note>[{e(prompt['split'])} caption]</span>" if prompt.get("split") else ""
        parts.append(f"<section><h3>{p + 1}. {e(prompt['prompt'])}{split}</h3>")
        if prompt.get("generate_from") and prompt["generate_from"] != prompt["prompt"]:
            parts.append(f"<p class=note>generated from: {e(prompt['generate_from'])}</p>")
        parts.append("<table><tr><th>seed</th>" + "".join(
            f"<th>{e(m['label'])}<br><span class=note>NFE {fmt(m['effective_nfe'], 3)}</span></th>" for m in models)
            + "</tr>")
        for i, seed in enumerate(prompt["seeds"]):
            cells = "".join(
                f'<td><video src="{e(relative_video_path(m["sample_dir"], m["files"][p][i]))}" autoplay loop muted '
                f'playsinline controls preload="metadata"></video>{_reading(m, p, i)}</td>' for m in models)
            parts.append(f"<tr><td>{seed}</td>{cells}</tr>")
        parts.append("</table></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _reading(model: dict, p: int, i: int) -> str:
    """The toy analyzer's reading of one clip, when the suite recorded it."""
    readings = model.get("readings")
    if not readings:
        return ""
    r = readings[p][i]
    return f"<span class=note>{'&#10003;' if r['match'] else '&#10007;'} {html.escape(r['read'])}</span>"
