"""Localise defects in image files with an exported model (export.py): needs jax, numpy and image I/O only.

    python predict.py --model exported/brick part1.png part2.jpg
    python predict.py --model exported/brick new_parts/ --out predictions/
    python predict.py --model exported/brick "line3/**/*.png"

For each image: the raw anomaly map at the image's size (maps/<name>.tiff, float32), the mask at
the stored pixel threshold (masks/<name>.png), an overlay (overlays/<name>.png) and a row of
scores.csv: the image score (as project.py's, of the map at the model size), the normalised score
s / (s + t) (0.5 at the stored image threshold t) and the label (1: score >= t). <name> is the
file's path relative to the inputs' common folder, extension kept.

Exit status: 0 every image processed; 1 some inputs could not be read (reported on stderr and
as status "error" rows of scores.csv; the others were processed); 2 usage error, no input found
or a model folder that cannot be used (the message says how to re-export it).
"""
import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model folder (export.py --out)")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--batch-size", type=int, default=16, help="model inputs (images or tiles) per program call")
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--no-masks", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error("--batch-size: give 1 or more")
    from iepjax import cpu_runtime
    cpu_runtime.use_cpu_cores()  # on a CPU, one JAX device per core: batches run side by side
    from iepjax.predictor import ExportError, predict_paths
    try:
        s = predict_paths(a.model, a.images, a.out, batch_size=a.batch_size, overlays=not a.no_overlays,
                          masks=not a.no_masks, progress=not a.no_progress)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if s.n_images == 0:
        print("error: no images found", file=sys.stderr)
        return 2
    print(f"{s.n_ok} of {s.n_images} images processed, {s.n_flagged} above the image threshold"
          + (f"; {len(s.failed)} failed (status 'error' in scores.csv)" if s.failed else ""))
    print(f"output folder: {s.out_dir}")
    return 1 if s.failed else 0


if __name__ == "__main__":
    sys.exit(main())
