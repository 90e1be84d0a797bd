"""reasonscope: mechanistic interpretability for reasoning language models.

Data flows one way: model -> traces -> activation store -> heads | probes | steering -> artifacts.
"""

from .models import Geometry, ModelHandle, load_model

__version__ = "0.1.0"
__all__ = ["Geometry", "ModelHandle", "__version__", "load_model"]
