"""jupyter-llm: LLM inference inside Jupyter.

`%load_ext jupyter_llm` registers the magics; the same things are possible from Python:

    import jupyter_llm as jl
    jl.get_manager().load("hf")
    print(jl.get_manager().generate("The capital of France is", jl.SamplingParams(max_tokens=8))[0].text)

This module imports no torch: heavy imports happen when a backend loads.
"""
from __future__ import annotations

from typing import Any

from jupyter_llm.errors import ParamError
from jupyter_llm.schema import Completion, GenerationRequest, SamplingParams, TokenEvent, TokenLogprob

__version__ = "0.1.0"
__all__ = [
    "Completion",
    "GenerationRequest",
    "ParamError",
    "Playground",
    "SamplingParams",
    "TokenEvent",
    "TokenLogprob",
    "available_backends",
    "get_manager",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def __getattr__(name: str) -> Any:
    # Lazy: the widget imports anywidget/ipywidgets only when someone asks for it.
    if name == "Playground":
        from jupyter_llm.notebook.widgets import Playground

        return Playground
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_manager() -> Any:
    """The kernel's one EngineManager (created on first use)."""
    from jupyter_llm.manager import get_manager as _get

    return _get()


def available_backends() -> list:
    """Every registered backend kind, whether it can load here and, if not, why."""
    from jupyter_llm.backends import available_backends as _available

    return _available()


def load_ipython_extension(ipython: Any) -> None:
    from jupyter_llm.notebook.magics import LLMMagics

    magics = LLMMagics(shell=ipython)
    ipython.register_magics(magics)
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)
    from jupyter_llm.notebook.labext import (
        register as _register_labext,  # the JupyterLab status bar's comm (labextension/)
    )

    _register_labext(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from jupyter_llm.notebook.magics import LLMMagics

    ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, LLMMagics)]
    from jupyter_llm.notebook.labext import unregister as _unregister_labext

    _unregister_labext(ipython)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """The prebuilt JupyterLab extension (built from labextension/ into jupyter_llm/labextension/)."""
    return [{"src": "labextension", "dest": "jupyter-llm"}]
