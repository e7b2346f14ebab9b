"""Model families behind one seam. Importing this package registers every family."""

from . import cogvideox, flux, sd, sd3, wan  # noqa: F401  (registration side effects)
from .base import FAMILIES, Cond, DiffusionModel, ModelError, SampleOutput, cat_cond, index_cond, register_family
from .loading import load_model, resolve_dtype

__all__ = [
    "FAMILIES",
    "Cond",
    "DiffusionModel",
    "ModelError",
    "SampleOutput",
    "cat_cond",
    "index_cond",
    "load_model",
    "register_family",
    "resolve_dtype",
]
