"""reasonscope: mechanistic interpretability for reasoning language models.

Data flows one way: model -> traces -> activation store -> heads | probes | steering -> artifacts.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import Geometry, ModelHandle, load_model

__version__ = "0.1.0"
__all__ = ["Geometry", "ModelHandle", "__version__", "load_model"]


def __getattr__(name: str) -> Any:
    """``reasonscope.load_model`` and friends, imported on first use: ``import reasonscope`` (and with it
    ``reasonscope --help``) does not load torch."""
    if name in ("Geometry", "ModelHandle", "load_model"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'reasonscope' has no attribute {name!r}")
