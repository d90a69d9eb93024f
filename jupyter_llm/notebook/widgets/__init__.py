"""Notebook widgets (anywidget: the ES module and CSS files sit beside each class).
Imported only when used, so that `import jupyter_llm` and `%load_ext` stay light."""
from jupyter_llm.notebook.widgets.playground import Playground

__all__ = ["Playground"]
