"""The backends the conformance kit runs against: each entry loads one into the shared
manager and returns its name. Later backends add themselves to BACKENDS."""
from __future__ import annotations

import pytest

# name -> fixture that returns the loaded backend name in the session manager
BACKENDS = ["tiny_hf"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.getfixturevalue(request.param)
