"""Time of predict.py per image on a trained run's test images, and its agreement with project.py; one JSON line.

    python benchmarks/predict.py --run results/vae/textures/brick/v0 --work /tmp/predict_bench
    python benchmarks/predict.py --run RUN --work DIR --batch-size 32 --cpu-devices 1

Steps: export the run (`iepjax.export.export_run`, timed) into WORK/model; write the category's
test images as PNG files into WORK/images; then, in fresh subprocesses that import no flax:

  predict_py_s     `predict.py --model WORK/model WORK/images` end to end (interpreter start, imports,
                   loading, compilation, projection, TIFF/mask/overlay writing), wall seconds
  load_s           `iepjax.Predictor(WORK/model)`: read, check and deserialize the artefacts
  first_s          the first `predict` over all images (includes the XLA compilation)
  steady_s         a second `predict` over the same images (compiled program)
  per_image_s      predict_py_s / images, and steady_s / images (`steady_per_image_s`)

If the run has a projection with TIFF maps (project.py on the same test split), the maps of
predict.py are compared with them (`max_abs_diff_vs_project`, `labels_agree`: the image labels
of scores.csv against the projection's, at the same threshold when the export took it from
that projection). `loadavg` is the 1-minute load average at the start: the machine may be shared.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common

_INNER = r"""
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from iepjax import cpu_runtime
cpu_runtime.use_cpu_cores(None if {devices} is None else {devices})
from iepjax import Predictor
p = Predictor({model!r}, batch_size={batch})
t1 = time.perf_counter()
files = sorted(str(f) for f in Path({images!r}).glob("*.png"))
p.predict(files)
t2 = time.perf_counter()
p.predict(files)
t3 = time.perf_counter()
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"flax", "optax", "orbax", "tensorflow_datasets"}})
import jax
print(json.dumps({{"load_s": t1 - t0, "first_s": t2 - t1, "steady_s": t3 - t2, "images": len(files),
                  "devices": len(p.devices), "training_modules_imported": heavy}}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a trained run folder (it is only read)")
    p.add_argument("--work", required=True, help="scratch folder for the export, the images and the predictions")
    p.add_argument("--tfds-dir", default=None, help="where TFDS keeps the prepared test split")
    p.add_argument("--batch-size", type=common.positive_int, default=16)
    p.add_argument("--cpu-devices", type=common.positive_int, default=None, help="default: one per core")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    row: dict = {"loadavg": os.getloadavg()[0], "cpus": os.cpu_count(), "batch_size": a.batch_size}

    from iepjax import cpu_runtime
    cpu_runtime.use_cpu_cores(a.cpu_devices)  # as train.py (a checkpoint restores onto its device count)
    from iepjax.export import export_run
    t = time.perf_counter()
    # a benchmark of speed and agreement with project.py: a collapsed model is as good a subject as any
    model = export_run(work / "model", run=a.run, tfds_dir=a.tfds_dir, progress=False, allow_collapse=True)
    row["export_s"] = round(time.perf_counter() - t, 2)
    meta = json.loads((model / "metadata.json").read_text())
    row.update(category=meta["source"]["category"], platforms=meta["platforms"],
               model_size=meta["model"]["size"], steps=meta["projection"]["steps"])

    from PIL import Image

    from iepjax.data import load_split
    test = load_split(meta["source"]["dataset"], meta["source"]["category"], "test", a.tfds_dir, progress=False)
    images = work / "images"
    images.mkdir(exist_ok=True)
    names = {}
    for id_, im in zip(test.ids, test.images):
        name = id_.replace("/", "__") + ".png"
        Image.fromarray(im[..., 0] if im.shape[2] == 1 else im).save(images / name)
        names[name] = id_
    row["images"] = len(names)

    env = common.env({"TF_CPP_MIN_LOG_LEVEL": "3"})
    if a.cpu_devices:
        env["JAX_NUM_CPU_DEVICES"] = str(a.cpu_devices)
    out = work / "pred"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(common.ROOT / "predict.py"), "--model", str(model), str(images),
                        "--out", str(out), "--no-progress", "--batch-size", str(a.batch_size)],
                       env=env, capture_output=True, text=True)
    row["predict_py_s"] = round(time.perf_counter() - t, 2)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    row["per_image_s"] = round(row["predict_py_s"] / len(names), 3)
    inner = _INNER.format(model=str(model), images=str(images), batch=a.batch_size, devices=a.cpu_devices)
    r = subprocess.run([sys.executable, "-c", inner], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    inside = json.loads(r.stdout.strip().splitlines()[-1])
    row.update({k: (round(v, 2) if isinstance(v, float) else v) for k, v in inside.items() if k != "images"})
    row["steady_per_image_s"] = round(inside["steady_s"] / len(names), 3)

    proj = meta["source"].get("projection_dir")
    if proj and (Path(proj) / "anomaly_maps" / "grad").is_dir():
        import numpy as np
        import tifffile
        from iepjax.outputs import tiff_path
        diffs = []
        for name, id_ in names.items():
            ref = tifffile.imread(tiff_path(Path(proj) / "anomaly_maps" / "grad", meta["source"]["category"], id_))
            diffs.append(float(np.max(np.abs(tifffile.imread(out / "maps" / f"{name}.tiff") - ref))))
        row["max_abs_diff_vs_project"] = max(diffs)
        with open(Path(proj) / "scores.csv", newline="") as f:
            theirs = {r["file"]: int(r["pred_label"]) for r in csv.DictReader(f)}
        with open(out / "scores.csv", newline="") as f:
            ours = {names[r["file"]]: int(r["label"]) for r in csv.DictReader(f)}
        row["labels_agree"] = f"{sum(theirs[k] == v for k, v in ours.items())}/{len(ours)}"
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
