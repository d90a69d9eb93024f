"""Progress bars in a notebook: one display updated in place, so that what the notebook stores
(the display in its last update) is the bar's final state, in every frontend."""
import re

import pytest
from IPython.utils.capture import capture_output

from jupyter_llm import progress


def stored(captured):
    """Each display as a notebook stores it: in its last update."""
    last = {}
    for i, out in enumerate(captured.outputs):
        last[(out.transient or {}).get("display_id", i)] = out.data
    return list(last.values())


@pytest.fixture
def notebook(shell, monkeypatch):
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    return shell


def test_a_finished_bar_is_stored_at_its_final_count(notebook):
    with capture_output() as captured, progress.steps(True, "Loading tiny", 3) as bar:
        for _ in range(3):
            bar.update(1)
    [bar_output] = stored(captured)
    assert re.match(r"Loading tiny: 100%\|█+\| 3/3 \[", bar_output["text/plain"])
    assert "<progress value='3' max='3'>" in bar_output["text/html"] and "100% 3/3" in bar_output["text/html"]
    assert captured.outputs[0].data["text/plain"].startswith("Loading tiny:   0%")  # first shown, then updated


def test_a_bar_that_fails_midway_shows_where_it_stopped(notebook):
    with capture_output() as captured, pytest.raises(RuntimeError), progress.steps(True, "Converting", 4) as bar:
        bar.update(1)
        raise RuntimeError("broken file")
    [bar_output] = stored(captured)
    assert " 25%" in bar_output["text/plain"] and "1/4" in bar_output["text/plain"]


def test_updates_are_rate_limited_but_the_last_state_always_shows(notebook):
    with capture_output() as captured, progress.steps(True, "Benchmark", 500) as bar:
        for _ in range(500):
            bar.update(1)
    assert len(captured.outputs) < 20  # 500 steps in well under a second: a handful of updates
    assert "500/500" in stored(captured)[0]["text/plain"]


def test_outside_a_kernel_it_is_tqdm_and_disabled_it_is_silent(shell):
    assert not progress.in_notebook()  # an InteractiveShell without a kernel
    with capture_output() as captured, progress.steps(True, "Loud", 2) as bar:
        bar.update(2)
    assert captured.outputs == [] and "Loud:   0%" in captured.stderr  # tqdm, erased when done (leave=False)
    with capture_output() as captured, progress.steps(False, "Quiet", 2) as bar:
        bar.update(2)
    assert captured.outputs == [] and captured.stdout == captured.stderr == ""


def test_transformers_own_bars_are_off_inside_ours_and_back_after(notebook):
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()
    with capture_output(), progress.steps(True, "Loading", 1) as bar:
        assert not logging.is_progress_bar_enabled()  # its "Loading weights" widget would stay at 0%
        bar.update(1)
    assert logging.is_progress_bar_enabled()
