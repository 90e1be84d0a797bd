"""The reasonscope explorer (Streamlit) and the end-to-end demo; mounted on the CLI as ``demo`` and ``app``.

The core package never imports this one; it reads every stage's artifact through that artifact's ``open`` API.
"""
