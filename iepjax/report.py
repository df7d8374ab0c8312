"""Human-readable outputs: the text a script prints, scores.csv, an offline index.html, and the
reproduction tables (results.csv, results.md) of `pipelines.reproduce`.
"""
from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path

import numpy as np

from iepjax.runs import atomic_write_text

SCORE_COLUMNS = ("file", "defect_type", "image_score", "label", "pred_label")
INFER_COLUMNS = ("file", "image_score", "pred_label", "area_above_pixel_threshold", "size")


def format_table(result: dict) -> str:
    """The metrics as a small text table (rows recon and grad)."""
    lines = [f"{'map':<6} {'pixel AUROC':>12} {'image AUROC':>12} {'AU-PRO@0.3':>11}"]
    for row in ("recon", "grad"):
        r = result[row]
        lines.append(f"{row:<6} {r['pixel_auroc']:>12.4f} {r['image_auroc']:>12.4f} {r['pixel_aupro']:>11.4f}")
    if result.get("per_kind"):
        lines.append("pixel AUROC by defect kind (with the good images), recon -> grad: " + ", ".join(
            f"{kind} {k['recon']['pixel_auroc']:.3f} -> {k['grad']['pixel_auroc']:.3f}"
            for kind, k in result["per_kind"].items()))
    return "\n".join(lines)


def image_score_name(m: dict) -> str:
    """The image score of a map config as stored ({"image_score": ..., "topk_frac": ...}), in words."""
    return {"topk": f"mean of the top {100 * m.get('topk_frac', 0):g} % map pixels",
            "smoothed_max": f"max of the map smoothed by {m.get('smoothed_max_sigma')} px",
            "area": "share of pixels above the pixel threshold"}.get(m.get("image_score", "max"),
                                                                      "max of the map (the paper's)")


def format_image_score(result: dict) -> str:
    """One line naming the image score of a projection's metrics.json ("map"), with the image AUROC of
    the map's maximum (the paper's score) when another score was used."""
    m = result.get("map") or {}
    score, name = m.get("image_score", "max"), image_score_name(m)
    if score == "max" or "image_auroc_max" not in result.get("grad", {}):
        return f"image score: {name}"
    return (f"image score: {name} (image AUROC of the max: recon {result['recon']['image_auroc_max']:.4f}, "
            f"grad {result['grad']['image_auroc_max']:.4f})")


def steady_rate(timing: dict) -> str:
    """The steady-state throughput of a projection's timing record, or why there is none (every image
    was in the first batch, whose time includes the compile)."""
    rate = timing.get("steady_img_per_s")
    if rate is None:
        return "no steady-state rate (every image was in the first batch)"
    return f"steady state {rate} img/s"


def format_projection(result: dict) -> str:
    """What project.py prints about a projection's metrics.json: the table, image score, thresholds and timing."""
    th, t = result["thresholds"], result["timing"]
    where = " (during threshold calibration)" if t.get("compiled_in") else ""
    lines = [format_table(result), format_image_score(result),
             f"thresholds ({th['source']}): pixel {result['grad']['pixel_threshold']:.4g}, "
             f"image {result['grad']['image_threshold']:.4g}",
             f"compile {t['compile_s']:.1f} s{where}, total {t['total_s']:.1f} s, {steady_rate(t)}"]
    if "protocol" in result:
        lines.append(f"metrics on maps at the original image sizes; TIFF maps: {result['protocol']['tiff_maps']['grad']}")
    return "\n".join(lines)


def format_inference(summary: dict) -> str:
    """What project.py --input-dir prints about a folder's summary.json."""
    return (f"{summary['n_images']} images, {summary['n_flagged']} above the image threshold "
            f"{summary['image_threshold']:.4g} ({summary['thresholds_from']})")


def format_collapse(c) -> str:
    """The collapse check of a trained model (`training.CollapseReport`) in one line."""
    return (f"reconstruction loss per pixel {c.recon_per_pixel:.4f} (constant predictor {c.constant_per_pixel:.4f}, "
            f"ratio {c.ratio:.3f}), KL per image {c.kl_per_image:.2f}")


def format_thresholds(stats: dict) -> str:
    """The thresholds fitted on a run's held-out normal images ({"grad", "recon"} -> NormalStats), grad row."""
    g = stats["grad"]
    left_out = f" ({g.n_excluded} more left out: frozen at step 0 by early stopping)" if g.n_excluded else ""
    return (f"thresholds from {g.n_images} held-out normal images{left_out}: pixel {g.pixel_threshold:.4g} "
            f"(q {g.pixel_quantile}), image {g.image_threshold:.4g} (q {g.image_quantile})")


def write_scores_csv(path: Path, ids: list[str], defect_types: list[str], scores_N: np.ndarray,
                     labels_N: np.ndarray | None, threshold: float) -> None:
    """One row per image: file id, defect kind, image score, label, predicted label."""
    write_csv(path, SCORE_COLUMNS, [[id_, defect_types[i], f"{float(scores_N[i]):.6g}",
                                     "" if labels_N is None else int(labels_N[i]), int(scores_N[i] >= threshold)]
                                    for i, id_ in enumerate(ids)])


def write_csv(path: Path, columns: tuple[str, ...], rows: list) -> None:
    """A CSV file with a header row `columns` and `rows` (lists)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    w.writerows(rows)
    atomic_write_text(Path(path), buf.getvalue())


def pick_cases(scores_N: np.ndarray, labels_N: np.ndarray, k: int = 3) -> dict:
    """Indices of the cases a person should look at first.

    best: defective images with the highest scores; worst: defective images with the lowest scores
    (misses) and good images with the highest (false alarms); strip: two defects and one good
    image for the iteration strip.
    """
    scores, labels = np.asarray(scores_N), np.asarray(labels_N)
    bad = np.flatnonzero(labels == 1)
    good = np.flatnonzero(labels == 0)
    bad_sorted = bad[np.argsort(-scores[bad], kind="stable")]
    good_sorted = good[np.argsort(-scores[good], kind="stable")]
    strip = list(bad_sorted[:2]) + list(good_sorted[-1:])
    if not strip:
        strip = [0]
    return {"best": [int(i) for i in bad_sorted[:k]],
            "worst_missed": [int(i) for i in bad_sorted[::-1][:k]],
            "worst_false_alarm": [int(i) for i in good_sorted[:k]],
            "strip": [int(i) for i in strip]}


def _panel_name(id_: str) -> str:
    return "overlays/" + id_.replace("/", "_") + ".png"


def write_html(out_dir: Path, result: dict, ids: list[str], defect_types: list[str], scores_N: np.ndarray,
               labels_N: np.ndarray, picks: dict, overlays: bool) -> None:
    """index.html: metrics table, thresholds, energy and ROC plots, best/worst cases and, with
    `overlays`, the iteration strip and each case's panel."""
    e = html.escape
    strip = '<h2>The projection over the iterations</h2><img src="trajectory.png" width="900">' if overlays else ""
    rows = []
    for row in ("recon", "grad"):
        r = result[row]
        rows.append(f"<tr><td>{row}</td><td>{r['pixel_auroc']:.4f}</td><td>{r['image_auroc']:.4f}</td>"
                    f"<td>{r['pixel_aupro']:.4f}</td><td>{r.get('pixel_f1', float('nan')):.4f}</td>"
                    f"<td>{r.get('image_f1', float('nan')):.4f}</td><td>{r.get('pixel_threshold', float('nan')):.4g}</td>"
                    f"<td>{r.get('image_threshold', float('nan')):.4g}</td></tr>")
    kind_rows = []
    for kind, k in result.get("per_kind", {}).items():
        kind_rows.append(f"<tr><td>{e(kind)}</td><td>{k['n_images']}</td>"
                         + "".join(f"<td>{k[row][m]:.4f}</td>" for row in ("recon", "grad")
                                   for m in ("pixel_auroc", "image_auroc", "pixel_aupro")) + "</tr>")
    per_kind = ("" if not kind_rows else
                "<h2>By defect kind</h2><p>Each kind with the good images.</p><table><tr><th>kind</th><th>images</th>"
                "<th>recon pixel AUROC</th><th>recon image AUROC</th><th>recon AU-PRO</th><th>grad pixel AUROC</th>"
                "<th>grad image AUROC</th><th>grad AU-PRO</th></tr>" + "".join(kind_rows) + "</table>")
    th = result.get("thresholds", {})
    t = result.get("timing", {})

    def cases(title: str, idx: list[int]) -> str:
        if not idx:
            return ""
        items = []
        for i in idx:
            cap = f"{e(ids[i])} ({e(defect_types[i])}), score {float(scores_N[i]):.4g}"
            img = f'<img src="{e(_panel_name(ids[i]))}" width="900">' if overlays else ""
            items.append(f"<figure>{img}<figcaption>{cap}</figcaption></figure>")
        return f"<h2>{e(title)}</h2>" + "".join(items)

    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>iepjax report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:3px 8px;text-align:right}}figure{{margin:8px 0}}</style></head><body>
<h1>Anomaly localisation report</h1>
<table><tr><th>map</th><th>pixel AUROC</th><th>image AUROC</th><th>AU-PRO@0.3</th><th>pixel F1</th>
<th>image F1</th><th>pixel threshold</th><th>image threshold</th></tr>{''.join(rows)}</table>
{per_kind}
<p>{e(format_image_score(result))}.</p>
<p>Thresholds: {e(str(th.get('source', '')))}; pixel quantile {th.get('pixel_quantile')}, image quantile
{th.get('image_quantile')}, {th.get('n_normal_images')} normal images. Test labels were not used to choose them.</p>
<p>Timing: compile {t.get('compile_s')} s, total {t.get('total_s')} s, {e(steady_rate(t))}.</p>
<h2>Convergence</h2><img src="energy.png"> <img src="roc.png">
{strip}
{cases('Best detected defects', picks['best'])}
{cases('Worst: missed defects', picks['worst_missed'])}
{cases('Worst: false alarms on good images', picks['worst_false_alarm'])}
<p>Files: metrics.json, thresholds.json (the thresholds used), scores.csv, maps.npz (raw float maps),
overlays/.</p>
</body></html>"""
    atomic_write_text(Path(out_dir) / "index.html", body)


# --------------------------------------------------------------------------- reproduction tables

# Reported means of pixel AUROC over the 15 MVTec AD categories (docs/method.md, Evaluation).
PAPER = [("VAE-grad (Dehaene et al. 2020, as listed)", 0.892), ("VAE-grad (as quoted by a later paper)", 0.86),
         ("AE-SSIM (Bergmann et al.)", 0.87), ("AE-L2", 0.82)]
# The table's columns (docs/method.md, Models): (label, model, row of its projection: recon = the plain
# model's map, grad = after the projection), and the paper's reported mean where there is one.
TABLE_COLUMNS = (("AE-L2", "ae_l2", "recon"), ("AE-L2-grad", "ae_l2", "grad"), ("AE-SSIM", "ae_ssim", "recon"),
                 ("AE-SSIM-grad", "ae_ssim", "grad"), ("VAE", "vae", "recon"), ("VAE-grad", "vae", "grad"))
PAPER_MEANS = {"AE-L2": "0.82", "AE-SSIM": "0.87", "VAE-grad": "0.86-0.89"}
ABLATION_LABELS = (("paper", "VAE-grad"), ("detached", "detached gradient"), ("no_weighting", "no weighting"),
                   ("no_kl", "no KL"), ("no_early_stop", "no early stopping"))
REPRODUCE_COLUMNS = ("category", "kind", "model", "variant", "status", "train_steps", "collapsed", "n_test",
                     "recon_pixel_auroc", "grad_pixel_auroc", "recon_image_auroc", "grad_image_auroc", "recon_aupro",
                     "grad_aupro", "alpha", "lam", "skipped_pixel_images", "minutes", "run_dir", "projection_dir")


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _cell(rows: list[dict], category: str, model: str, variant: str = "paper") -> dict | None:
    for r in rows:
        if (r.get("category"), r.get("model", "vae"), r.get("variant", "paper")) == (category, model, variant):
            return r
    return None


def write_reproduction(out: Path, rows: list[dict], meta: dict) -> None:
    """results.csv (one row per category, model and projection variant: pixel AUROC, image AUROC and
    AU-PRO of the plain and the -grad map) and results.md (the paper's layout: categories and their
    mean by AE-L2, AE-L2-grad, AE-SSIM, AE-SSIM-grad, VAE, VAE-grad pixel AUROC, beside the paper's
    reported means; then the VAE-grad ablations when measured).

    Numbers in the table are only ever those measured here; the paper's are quoted as reported.
    `meta`: data (str), size, steps and proj_steps (None: per preset), categories (the list asked
    for); optional models (the models asked for).
    """
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=REPRODUCE_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())

    cats = list(dict.fromkeys(r["category"] for r in rows))
    ok = [r for r in rows if r.get("status") == "ok"]
    lines = ["# Reproduction of the paper's comparison (iepjax)", "",
             f"Data: {meta['data']}; model input {meta['size']}x{meta['size']}; training steps "
             f"{meta['steps'] or 'per preset'}; projection steps {meta['proj_steps'] or 'per preset'}; "
             f"{len({r['category'] for r in ok})} of {_count(len(meta['categories']), 'category', 'categories')} "
             "evaluated.", "",
             "Pixel AUROC (all pixels of a category pooled) on anomaly maps at each test image's original size. "
             "Plain rows: AE-L2 = per-pixel squared error, AE-SSIM = 1 - SSIM map, VAE = |x0 - f(x0)|; every "
             "-grad row = |x_T - x0| after the projection of the same trained model. Image AUROC and AU-PRO "
             "(up to FPR 0.3, normalised) are in results.csv.", "",
             "| category | " + " | ".join(c[0] for c in TABLE_COLUMNS) + " | note |",
             "|---" * (len(TABLE_COLUMNS) + 2) + "|"]
    means = {}
    for label, model, row in TABLE_COLUMNS:
        vals = [r[f"{row}_pixel_auroc"] for r in ok if r.get("model", "vae") == model
                and r.get("variant", "paper") == "paper" and r.get(f"{row}_pixel_auroc") is not None
                and not math.isnan(r[f"{row}_pixel_auroc"])]
        means[label] = (sum(vals) / len(vals), len(vals)) if vals else (None, 0)
    for cat in cats:
        cells, notes = [], []
        for label, model, row in TABLE_COLUMNS:
            r = _cell(rows, cat, model)
            cells.append(_fmt(r.get(f"{row}_pixel_auroc")) if r and r.get("status") == "ok" else "—")
            if r and row == "recon":
                if r.get("status") != "ok":
                    notes.append(f"{model}: {r['status']}")
                elif r.get("collapsed"):
                    notes.append(f"{model} collapsed to the mean")
                if r.get("skipped_pixel_images"):
                    notes.append(f"{model}: {r['skipped_pixel_images']} image(s) without masks skipped")
        lines.append(f"| {cat} | " + " | ".join(cells) + f" | {'; '.join(notes)} |")
    lines.append("| **mean** | " + " | ".join(f"{_fmt(means[c[0]][0])} ({means[c[0]][1]})" if means[c[0]][1] else "—"
                                             for c in TABLE_COLUMNS) + " | measured here (categories) |")
    lines.append("| *paper, reported mean* | " + " | ".join(PAPER_MEANS.get(c[0], "—") for c in TABLE_COLUMNS)
                 + " | MVTec AD, 15 categories |")
    ablated = [r for r in rows if r.get("variant", "paper") != "paper"]
    if ablated:
        abl_cats = list(dict.fromkeys(r["category"] for r in ablated))
        lines += ["", "## VAE-grad ablations (pixel AUROC)", "",
                  "One switch changed at a time on the same trained VAE: detached gradient = f(x) held constant "
                  "(the public ports); no weighting = plain gradient step, alpha times the mean (x0 - f(x0))^2 of "
                  "the held-out normal pixels; no KL = KL left out of the energy; no early stopping = T steps.", "",
                  "| category | " + " | ".join(lab for _, lab in ABLATION_LABELS) + " |",
                  "|---" * (len(ABLATION_LABELS) + 1) + "|"]
        for cat in abl_cats:
            cells = []
            for name, _ in ABLATION_LABELS:
                r = _cell(rows, cat, "vae", name)
                cells.append(_fmt(r.get("grad_pixel_auroc")) if r and r.get("status") == "ok" else
                             (r["status"][:60] if r else "—"))
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    lines += ["", "## Beside the paper (mean pixel AUROC over categories)", "",
              "| method | mean pixel AUROC | source |", "|---|---|---|"]
    lines += [f"| {label}, this run | {_fmt(means[label][0])} | measured here, {_count(means[label][1], 'category', 'categories')} |"
              for label, _, _ in TABLE_COLUMNS if means[label][1]]
    lines += [f"| {name} | {v:.3f} | reported, 15 categories |" for name, v in PAPER]
    lines += ["", "The paper's per-category values are not available here, so only means are compared. "
              "A mean over fewer than 15 MVTec AD categories, or over other data, is not comparable with the paper's."]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")


def _count(n: int, one: str, many: str) -> str:
    """"1 category", "2 categories"."""
    return f"{n} {one if n == 1 else many}"
