"""The playground widget's model: traits, validation, generate/stop through the manager with
a tiny real backend, batched messages, results and errors. The browser side is in tests/browser/."""
from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest

from jupyter_llm import SamplingParams
from jupyter_llm.errors import ParamError

pytest.importorskip("anywidget")
from jupyter_llm.notebook.widgets import Playground
from paths import ROOT


class Recorder:
    """Stands in for the widget's comm send: keeps every custom message."""

    def __init__(self) -> None:
        self.messages: list[dict] = []

    def __call__(self, content: dict, buffers=None) -> None:
        self.messages.append(content)

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]

    def segments(self) -> list[dict]:
        return [item for m in self.of("tokens") for item in m["items"] if "t" in item]

    def finishes(self) -> list[dict]:
        return [item for m in self.of("tokens") for item in m["items"] if "finish" in item]


def playground(backend: str, prompt: str = "Hello", **params) -> tuple[Playground, Recorder]:
    widget = Playground(prompt=prompt, backend=backend, params=SamplingParams(**params))
    recorder = Recorder()
    widget.send = recorder
    return widget, recorder


def from_browser(widget: Playground, **state) -> None:
    """A state update as the browser sends it, through the comm handler."""
    widget._handle_msg({"content": {"data": {"method": "update", "state": state}}, "buffers": []})


def click(widget: Playground, kind: str) -> None:
    widget._handle_msg({"content": {"data": {"method": "custom", "content": {"type": kind}}}, "buffers": []})


@pytest.fixture(scope="module")
def second_backend(manager, tiny_llama, tiny_hf):
    """A second loaded backend to compare with; the default stays tiny-hf."""
    manager.load("hf", str(tiny_llama), name="tiny-hf-b", progress=False)
    manager.use(tiny_hf)
    yield "tiny-hf-b"
    manager.unload("tiny-hf-b")


@pytest.fixture
def slow_steps(manager, tiny_hf):
    """Each engine step takes at least 10 ms: a long generation stays long on a fast machine."""
    engine = manager.get(tiny_hf).engine
    original = engine.step

    def slow():
        time.sleep(0.01)
        return original()

    engine.step = slow
    yield
    engine.step = original


def test_traits_round_trip_sampling_params(manager, tiny_hf):
    manager.use(tiny_hf)  # other tests may have loaded a later default
    widget = Playground()
    assert widget.backend == tiny_hf and tiny_hf in widget.backends and widget.error == ""
    params = SamplingParams(max_tokens=7, temperature=0.3, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1,
                            presence_penalty=0.5, frequency_penalty=-0.5, seed=42, stop=("\n", "END"), n=3,
                            logprobs=4, ignore_eos=True)
    widget.params = params
    assert widget.params == params
    assert (widget.temperature, widget.seed, widget.seed_locked, widget.stop_strings) == (0.3, 42, True, ["\n", "END"])
    widget.params = SamplingParams()
    assert widget.params.seed is None and widget.params.logprobs is None and not widget.seed_locked


def test_bad_values_from_the_browser_become_a_message_not_an_exception(tiny_hf):
    widget = Playground()
    from_browser(widget, temperature=-1)
    assert "temperature must be >= 0" in widget.error
    from_browser(widget, temperature=0.5)
    assert widget.error == ""
    from_browser(widget, top_p="high")  # the wrong type: the trait keeps its value
    assert "expected a float" in widget.error and widget.top_p == 1.0
    from_browser(widget, top_p=0.9)
    assert widget.error == "" and widget.params.top_p == 0.9
    widget.top_k = -5  # from Python the error shows too, and .params raises it
    assert "top_k must be >= 0" in widget.error
    with pytest.raises(ParamError, match="top_k must be >= 0"):
        _ = widget.params


def test_generate_with_bad_settings_shows_the_error(tiny_hf):
    widget, recorder = playground(tiny_hf)
    widget.n = 0
    click(widget, "generate")
    assert "n must be in [1, 128]" in widget.error and not widget.running and recorder.messages == []
    widget.n, widget.prompt = 1, "   "
    widget.generate()
    assert "prompt is empty" in widget.error
    widget.prompt, widget.backend = "Hi", "nope"
    widget.generate()
    assert "no backend named 'nope'" in widget.error and widget.completions == []


def test_generate_returns_at_once_and_streams_batched_messages(tiny_hf):
    widget, recorder = playground(tiny_hf, max_tokens=24, temperature=0, logprobs=3, ignore_eos=True)
    started = time.monotonic()
    widget.generate()
    assert time.monotonic() - started < 0.5 and widget.running
    [c] = widget.wait(60)
    assert not widget.running and widget.completions == [c]
    assert c.finish_reason == "length" and c.completion_tokens == 24 and c.backend == "hf"
    kinds = [m["type"] for m in recorder.messages]
    assert kinds[0] == "start" and kinds[-1] == "end" and set(kinds) == {"start", "tokens", "end"}
    assert recorder.messages[0]["columns"] == [{"backend": tiny_hf, "model": c.model, "sample": 0}]
    assert len(recorder.of("tokens")) < 24  # batched, not one message per token
    segments = recorder.segments()
    assert "".join(s["t"] for s in segments) == c.text and sum(s["k"] for s in segments) == 24
    tokens = [tok for s in segments for tok in s["p"]]
    assert len(tokens) == 24 and all(0 <= tok["p"] <= 1 and len(tok["alt"]) == 3 for tok in tokens)
    assert [tok["p"] for tok in tokens] == pytest.approx([2.718281828 ** lp.logprob for lp in c.logprobs], rel=1e-3)
    [finish] = recorder.finishes()
    assert finish["c"] == 0 and finish["finish"]["reason"] == "length" and finish["finish"]["tokens"] == 24
    assert finish["finish"]["ttft"] > 0 and recorder.messages[-1]["error"] == ""


def test_chat_mode_sends_the_system_prompt_and_the_prompt_as_messages(tiny_hf):
    widget, _ = playground(tiny_hf, prompt="Hi there", max_tokens=3)
    widget.chat, widget.system = True, "Be brief."
    widget.generate()
    [c] = widget.wait(60)
    assert widget._generation.lanes[0].request.messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert c.completion_tokens >= 1


def test_close_stops_the_generation(tiny_hf, slow_steps):
    widget, _ = playground(tiny_hf, max_tokens=400, ignore_eos=True)
    widget.generate()
    widget.close()
    [c] = widget.wait(30)
    assert c.finish_reason == "cancelled"


def test_seed_lock_reproduces_and_unlocked_seeds_change(tiny_hf):
    widget, _ = playground(tiny_hf, max_tokens=8, temperature=1.0, ignore_eos=True)
    seeds, texts = [], []
    for _ in range(2):
        widget.generate()
        texts.append(widget.wait(60)[0].text)
        seeds.append(widget.seed)
    assert seeds[0] != seeds[1]
    widget.seed_locked = True
    widget.generate()
    again = widget.wait(60)[0].text
    assert again == texts[1] and widget.seed == seeds[1]


def test_samples_and_a_compared_backend_sit_side_by_side(tiny_hf, second_backend):
    widget, recorder = playground(tiny_hf, max_tokens=5, temperature=0, n=2, logprobs=2, ignore_eos=True)
    widget.compare = second_backend
    widget.generate()
    completions = widget.wait(60)
    assert [(c.index, c.completion_tokens) for c in completions] == [(0, 5), (1, 5), (0, 5), (1, 5)]
    assert [(col["backend"], col["sample"]) for col in recorder.of("start")[0]["columns"]] == [
        (tiny_hf, 0), (tiny_hf, 1), (second_backend, 0), (second_backend, 1)]
    assert sorted(f["c"] for f in recorder.finishes()) == [0, 1, 2, 3]
    assert len({c.text for c in completions}) == 1  # the same weights, greedy: the same text


def test_stop_cancels_inside_the_backend_from_another_thread(manager, tiny_hf, slow_steps):
    widget, recorder = playground(tiny_hf, max_tokens=400, temperature=0, ignore_eos=True)
    widget.generate()
    backend = manager.get(tiny_hf)
    deadline = time.monotonic() + 30
    while not backend.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # some tokens (a random model's text may be held back as partial UTF-8)
    stopper = threading.Thread(target=widget.stop)
    stopper.start()
    stopper.join()
    [c] = widget.wait(30)
    assert c.finish_reason == "cancelled" and 0 < c.completion_tokens < 400
    assert recorder.finishes()[0]["finish"]["reason"] == "cancelled"
    deadline = time.monotonic() + 10
    while backend.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert manager.inflight() == 0 and backend.stats()["running"] == 0


def test_stop_before_the_first_token_and_through_the_button(tiny_hf):
    widget, recorder = playground(tiny_hf, max_tokens=400, ignore_eos=True)
    widget.generate()
    click(widget, "stop")
    [c] = widget.wait(30)
    assert c.finish_reason == "cancelled" and c.completion_tokens < 400 and not widget.running
    assert [f["finish"]["reason"] for f in recorder.finishes()] == ["cancelled"]


def test_stop_before_the_run_reaches_the_loop(manager, tiny_hf):
    widget, recorder = playground(tiny_hf, max_tokens=400, ignore_eos=True)
    blocker = threading.Event()
    manager.loop.call_soon_threadsafe(blocker.wait, 10)  # hold the loop: the run cannot start yet
    widget.generate()
    widget.stop()
    blocker.set()
    [c] = widget.wait(30)
    assert c.finish_reason == "cancelled" and c.completion_tokens == 0
    assert [f["finish"]["reason"] for f in recorder.finishes()] == ["cancelled"]


def test_controls_changed_while_generating_do_not_touch_the_run(tiny_hf):
    widget, recorder = playground(tiny_hf, max_tokens=30, temperature=0, ignore_eos=True)
    widget.generate()
    from_browser(widget, max_tokens=2, n=3, temperature=-5, prompt="Other")
    assert "temperature" in widget.error  # the new settings are checked, the run goes on
    [c] = widget.wait(60)
    assert c.completion_tokens == 30 and len(recorder.of("start")[0]["columns"]) == 1


def test_a_new_generate_replaces_the_running_one(tiny_hf):
    widget, recorder = playground(tiny_hf, max_tokens=400, ignore_eos=True)
    widget.generate()
    widget.max_tokens = 3
    widget.generate()
    [c] = widget.wait(60)
    assert c.completion_tokens == 3 and not widget.running
    first, second = [m["run"] for m in recorder.of("start")]
    assert [m["run"] for m in recorder.of("end")][-1] == second != first


def test_a_failing_backend_shows_its_error_in_the_widget(manager, tiny_hf):
    engine = manager.get(tiny_hf).engine
    original = engine.step

    def broken():
        raise RuntimeError("boom")

    widget, recorder = playground(tiny_hf, max_tokens=3)
    engine.step = broken
    try:
        widget.generate()
        [c] = widget.wait(60)
    finally:
        engine.step = original
        engine.rows, engine.removed = [], set()
    assert c.finish_reason == "error" and "boom" in widget.error and f"{tiny_hf}: " in widget.error
    assert recorder.finishes()[0]["finish"]["reason"] == "error" and "boom" in recorder.of("end")[0]["error"]
    widget.generate()  # the widget and the backend still work
    assert widget.wait(60)[0].finish_reason in ("length", "stop") and widget.error == ""


def test_an_unloaded_backend_is_a_message(manager, tiny_llama, tiny_hf):
    manager.load("hf", str(tiny_llama), name="tiny-hf-gone", progress=False)
    manager.use(tiny_hf)
    widget, _recorder = playground("tiny-hf-gone", max_tokens=3)
    manager.unload("tiny-hf-gone")
    click(widget, "generate")
    assert "no backend named 'tiny-hf-gone'" in widget.error and not widget.running


def test_messages_and_state_changes_from_several_threads(tiny_hf):
    widget, recorder = playground(tiny_hf, max_tokens=60, temperature=0.8, ignore_eos=True)
    failures: list[BaseException] = []

    def hammer() -> None:
        try:
            for i in range(200):
                from_browser(widget, temperature=0.1 + (i % 10) / 10, top_k=i % 5, prompt=f"p{i}")
        except BaseException as error:  # noqa: BLE001 (any failure in the thread fails the test)
            failures.append(error)

    widget.generate()
    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [c] = widget.wait(60)
    assert failures == [] and c.completion_tokens == 60 and widget.error == ""
    assert "".join(s["t"] for s in recorder.segments()) == c.text


def test_a_new_view_gets_the_current_output_replayed(tiny_hf):
    widget, recorder = playground(tiny_hf, max_tokens=6, temperature=0, ignore_eos=True)
    widget.generate()
    widget.wait(60)
    history = list(recorder.messages)
    recorder.messages.clear()
    click(widget, "hello")
    assert recorder.messages == history


def test_generate_from_the_browser_uses_the_settings_it_carries(tiny_hf):
    # ipywidgets sends one state update at a time and holds later ones back until the kernel has
    # answered; Generate (a custom message) would overtake them, so it carries the values on show.
    widget, recorder = playground(tiny_hf, prompt="Old prompt", max_tokens=30, temperature=0.7)
    settings = {"prompt": "Typed just before Ctrl+Enter", "max_tokens": 3, "temperature": 0, "n": 2,
                "ignore_eos": True, "running": True, "backends": [], "unknown": 1}  # the last three: ignored
    widget._handle_msg({"content": {"data": {"method": "custom", "content": {"type": "generate",
                                                                           "settings": settings}}},
                        "buffers": []})
    completions = widget.wait(60)
    assert (widget.prompt, widget.max_tokens, widget.temperature, widget.n) == (settings["prompt"], 3, 0, 2)
    assert [c.completion_tokens for c in completions] == [3, 3] and widget.error == ""
    assert len(recorder.of("start")[0]["columns"]) == 2 and tiny_hf in widget.backends
    from_browser(widget, prompt=settings["prompt"], max_tokens=3)  # the held-back update, late: no change
    assert widget.params.max_tokens == 3 and not widget.running


def test_the_browser_and_python_agree_on_the_settings_sent_with_generate():
    from jupyter_llm.notebook.widgets import playground as module

    js = (ROOT / "jupyter_llm" / "notebook" / "widgets" / "playground.js").read_text()
    listed = re.search(r"const SETTINGS = \[(.*?)\];", js, re.DOTALL).group(1)
    assert sorted(re.findall(r'"(\w+)"', listed)) == sorted(module.SETTINGS)
    assert set(module.SETTINGS) <= set(Playground.class_trait_names(sync=True))


def test_llm_playground_magic_displays_the_widget(shell, tiny_hf):
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        shell.run_cell("%llm_playground")
    [output] = captured.outputs
    assert "application/vnd.jupyter.widget-view+json" in output.data and "text/plain" in output.data


def test_import_and_load_ext_do_not_import_widgets():
    code = ("import sys, jupyter_llm; from jupyter_llm.notebook import magics; "
            "assert 'anywidget' not in sys.modules and 'ipywidgets' not in sys.modules; "
            "assert jupyter_llm.Playground.__name__ == 'Playground' and 'anywidget' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_javascript_and_css_are_bundled_package_data():
    folder = ROOT / "jupyter_llm" / "notebook" / "widgets"
    js = (folder / "playground.js").read_text()
    assert not re.search(r"^\s*import\s", js, re.MULTILINE) and "import(" not in js and "http" not in js
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject[pyproject.index("[tool.setuptools.package-data]"):]
    assert re.search(r'jupyter_llm = \[.*"notebook/widgets/\*\.js".*"notebook/widgets/\*\.css"', section)
