"""The human-readable outputs of a projection run: scores.csv and an offline index.html."""
from __future__ import annotations

import csv
import html
import io
from pathlib import Path

import numpy as np

from iepjax.runs import atomic_write_text

SCORE_COLUMNS = ("file", "defect_type", "image_score", "label", "pred_label")


def write_scores_csv(path: Path, ids: list[str], defect_types: list[str], scores_N: np.ndarray,
                     labels_N: np.ndarray | None, threshold: float) -> None:
    """One row per image: file id, defect kind, image score (max of map), label, predicted label."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SCORE_COLUMNS)
    for i, id_ in enumerate(ids):
        label = "" if labels_N is None else int(labels_N[i])
        w.writerow([id_, defect_types[i], f"{float(scores_N[i]):.6g}", label, int(scores_N[i] >= threshold)])
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
    """index.html: metrics table, thresholds, energy and ROC plots, iteration strip, best/worst cases."""
    e = html.escape
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
<p>Thresholds: {e(str(th.get('source', '')))}; pixel quantile {th.get('pixel_quantile')}, image quantile
{th.get('image_quantile')}, {th.get('n_normal_images')} normal images. Test labels were not used to choose them.</p>
<p>Timing: compile {t.get('compile_s')} s, total {t.get('total_s')} s, steady state {t.get('steady_img_per_s')} images/s.</p>
<h2>Convergence</h2><img src="energy.png"> <img src="roc.png">
<h2>The projection over the iterations</h2><img src="trajectory.png" width="900">
{cases('Best detected defects', picks['best'])}
{cases('Worst: missed defects', picks['worst_missed'])}
{cases('Worst: false alarms on good images', picks['worst_false_alarm'])}
<p>Files: metrics.json, thresholds.json (the thresholds used), scores.csv, maps.npz (raw float maps),
overlays/.</p>
</body></html>"""
    atomic_write_text(Path(out_dir) / "index.html", body)
