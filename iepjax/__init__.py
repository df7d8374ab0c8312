"""iepjax: iterative energy-based projection on a normal data manifold (Dehaene et al., ICLR 2020) in JAX.

Public API::

    from iepjax import ModelConfig, ProjectionConfig, VAE, init_params, project_fn
    result = project_fn(params, x0_BxHxWxC, ProjectionConfig(model=ModelConfig(channels=1)))
    result.maps  # (B, H, W) anomaly maps

The scripts' pipelines (train, project, infer, reproduce) are `iepjax.pipelines`, over the
configs of `iepjax.presets`.
"""
from iepjax.anomaly_maps import difference_map, gaussian_smooth, recon_map
from iepjax.config import DataConfig, ModelConfig, ProjectionConfig, ThresholdConfig, TrainConfig
from iepjax.energy import energy, reconstruct
from iepjax.losses import kl_divergence, model_loss
from iepjax.model import VAE, init_params
from iepjax.projection import ProjectionResult, descent_direction, project_fn, project_image, projection_step

__all__ = [
    "DataConfig", "ModelConfig", "ProjectionConfig", "ThresholdConfig", "TrainConfig", "VAE", "init_params", "energy", "reconstruct",
    "model_loss", "kl_divergence", "project_fn", "project_image", "projection_step", "descent_direction",
    "ProjectionResult",
    "difference_map", "gaussian_smooth", "recon_map",
]
__version__ = "0.1.0"
