"""The Gradio app (the only package that imports gradio). ``build_app()`` returns the Blocks."""

from qvlm.ui.app import build_app
from qvlm.ui.settings import Settings

__all__ = ["Settings", "build_app"]
