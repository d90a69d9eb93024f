"""Progress bars that show as a widget in notebooks and as text in a terminal."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def steps(enabled: bool, description: str, total: int) -> Iterator[object]:
    """A tqdm.auto bar over `total` coarse steps, or a silent stand-in."""
    if not enabled:
        yield _Silent()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, leave=False) as bar:
        yield bar
