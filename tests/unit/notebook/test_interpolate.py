from jupyter_llm.notebook.interpolate import interpolate, whole_variable


class Obj:
    name = "attr-value"


def test_known_names_are_replaced_unknown_braces_kept():
    ns = {"x": 5, "o": Obj()}
    assert interpolate("x={x} y={y} o={o.name}", ns) == "x=5 y={y} o=attr-value"
    assert interpolate("def f(): return {'a': 1}", ns) == "def f(): return {'a': 1}"
    assert interpolate("{{x}} and {x}", ns) == "{x} and 5"
    assert interpolate("f'{x!r}' {x:>3}", ns) == "f'{x!r}' {x:>3}"


def test_whole_variable():
    history = [{"role": "user", "content": "hi"}]
    assert whole_variable("  {history}\n", {"history": history}) is history
    assert whole_variable("say {history}", {"history": history}) is None
    assert whole_variable("{missing}", {}) is None
