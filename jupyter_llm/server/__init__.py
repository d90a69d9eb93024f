"""The OpenAI-compatible HTTP server.

    app.create_app(manager, settings)   the FastAPI app over a manager's loaded backends
    runner.start_server(manager, settings)   runs it in a background thread (%llm_serve)
    runner.serve_forever(manager, settings)  runs it in the foreground (jupyter-llm serve)

This package's __init__ imports nothing heavy: `%load_ext jupyter_llm` reads the settings.
"""
from __future__ import annotations

from jupyter_llm.server.settings import ServerSettings

__all__ = ["ServerSettings"]
