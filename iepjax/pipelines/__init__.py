"""The pipelines the scripts run, each one library call over typed configs (`iepjax.config`, `iepjax.presets`):

    pipelines.train      train_category / train_run: data -> run folder -> model -> thresholds (train.py)
    pipelines.project    project_run: thresholds, localisation, scores, outputs of a test split (project.py)
    pipelines.infer      infer_folder: maps and scores of a plain folder of images (project.py --input-dir)
    pipelines.reproduce  reproduce: the paper's comparison table (three models, -grad rows) over categories (reproduce.py)
"""
from iepjax.pipelines.infer import infer_folder
from iepjax.pipelines.project import project_run
from iepjax.pipelines.reproduce import Plan, reproduce
from iepjax.pipelines.train import RunFailed, train_category, train_run

__all__ = ["infer_folder", "project_run", "Plan", "reproduce", "RunFailed", "train_category", "train_run"]
