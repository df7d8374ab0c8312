"""iepjax: iterative energy-based projection on a normal data manifold (Dehaene et al., ICLR 2020) in JAX.

Public API::

    from iepjax import ModelConfig, ProjectionConfig, VAE, init_params, project_fn
    result = project_fn(params, x0_BxHxWxC, ProjectionConfig(model=ModelConfig(channels=1)))
    result.maps  # (B, H, W) anomaly maps

The scripts' pipelines (train, project, infer, reproduce) are `iepjax.pipelines`, over the
configs of `iepjax.presets`.

    from iepjax import Predictor  # an exported model (export.py): needs jax and numpy only
    Predictor("exported/brick").predict(["part.png"])

The energy of eq. (3) is `iepjax.energy.energy`: the package's name `energy` is its module (a
submodule's name always is, once imported). The names are imported on first use (PEP 562), so `import iepjax` and `iepjax.Predictor` do not
import flax, optax, orbax or TensorFlow Datasets; `iepjax.VAE` and the training code do.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

# public name -> the module that defines it
_SOURCES = {
    "DataConfig": "iepjax.config", "ModelConfig": "iepjax.config", "ProjectionConfig": "iepjax.config",
    "ThresholdConfig": "iepjax.config", "TrainConfig": "iepjax.config",
    "VAE": "iepjax.model", "init_params": "iepjax.model",
    "reconstruct": "iepjax.energy",
    "model_loss": "iepjax.losses", "kl_divergence": "iepjax.losses",
    "project_fn": "iepjax.projection", "project_image": "iepjax.projection",
    "projection_step": "iepjax.projection", "descent_direction": "iepjax.projection",
    "ProjectionResult": "iepjax.projection",
    "difference_map": "iepjax.anomaly_maps", "gaussian_smooth": "iepjax.anomaly_maps", "recon_map": "iepjax.anomaly_maps",
    "Predictor": "iepjax.predictor",
}

__all__ = list(_SOURCES)
__version__ = "0.1.0"


def __getattr__(name: str):
    """Import a public name's module on first access and cache the name in this module; a
    submodule's name imports the submodule (`iepjax.model` works after a bare `import iepjax`)."""
    source = _SOURCES.get(name)
    if source is not None:
        value = getattr(importlib.import_module(source), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'iepjax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from iepjax.anomaly_maps import difference_map, gaussian_smooth, recon_map
    from iepjax.config import DataConfig, ModelConfig, ProjectionConfig, ThresholdConfig, TrainConfig
    from iepjax.energy import reconstruct
    from iepjax.losses import kl_divergence, model_loss
    from iepjax.model import VAE, init_params
    from iepjax.predictor import Predictor
    from iepjax.projection import ProjectionResult, descent_direction, project_fn, project_image, projection_step
