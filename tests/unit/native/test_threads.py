"""ThreadChooser: one or all threads per step size, by the steps' own timings."""
from __future__ import annotations

from jupyter_llm.backends.native.threads import MAX_ADAPTIVE_TOKENS, ThreadChooser, bucket


def drive(chooser: ThreadChooser, tokens: int, cost: dict[int, float], steps: int) -> list[int]:
    """Run `steps` steps whose time depends only on the thread count; the counts used."""
    used = []
    for _ in range(steps):
        threads = chooser.threads_for(tokens, 2)
        chooser.record(tokens, threads, cost[threads], 2)
        used.append(threads)
    return used


def test_measures_both_then_keeps_the_faster():
    chooser = ThreadChooser(trials=3, remeasure_every=100)
    used = drive(chooser, 1, {1: 0.010, 2: 0.020}, 20)  # throttled OpenMP: one thread wins
    assert used[:6].count(1) == 3 and used[:6].count(2) == 3  # alternated while measuring
    assert set(used[6:]) == {1} and chooser.choices() == {1: 1}
    used = drive(chooser, 12, {1: 0.030, 2: 0.018}, 20)  # another size decides on its own
    assert set(used[6:]) == {2} and chooser.choices() == {1: 1, 16: 2}
    drive(chooser, 2, {1: 0.0195, 2: 0.020}, 10)  # one thread barely faster: within the jitter, keep all
    assert chooser.choices()[2] == 2


def test_measures_again_after_a_while():
    chooser = ThreadChooser(trials=2, remeasure_every=10)
    drive(chooser, 3, {1: 0.01, 2: 0.02}, 4)
    assert chooser.choices() == {4: 1}
    used = drive(chooser, 3, {1: 0.02, 2: 0.01}, 30)  # the process changed: two threads are faster now
    assert chooser.choices() == {4: 2} and used[-1] == 2


def test_large_steps_and_one_thread_are_left_alone():
    chooser = ThreadChooser()
    assert chooser.threads_for(MAX_ADAPTIVE_TOKENS + 1, 2) == 2
    assert chooser.threads_for(1, 1) == 1
    chooser.record(MAX_ADAPTIVE_TOKENS + 1, 2, 1.0, 2)
    assert chooser.choices() == {}
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]
