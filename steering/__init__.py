"""Steering reasoning models (ASC, hybrid base/thinking steering) and vector export.

``vector`` (:class:`~steering.vector.SteeringVector`: the artifact and ``apply``), ``extract`` (residuals, mean
difference, PCA), ``asc`` (ASC and Efficiency Steering with the KL-bounded strength), ``export`` (llama.cpp GGUF,
EasySteer, safetensors; imports), ``cli`` (``steer_app``, ``export_cmd``).
"""
