"""`jupyter-llm serve` with faults injected into the in-process backends' output processing, for
issue 19's item 9 (a compute thread that fails must not stop serving, and /health must say when a
backend cannot serve): a request with seed 666 raises inside output processing (outside the
engine's step), one with seed 667 ends the compute thread (SystemExit, which no handler takes).

    python tests/helpers/faulty_serve.py --backend native --model FOLDER --port 0 ...
"""
from __future__ import annotations

import sys

from jupyter_llm.cli import main
from jupyter_llm.output import SampleOutputProcessor

FAIL_SEED, KILL_SEED = 666, 667
_append = SampleOutputProcessor.append


def append(self, token_id, logprob=None):
    if self.params.seed == FAIL_SEED:
        raise RuntimeError("a fault injected into output processing")
    if self.params.seed == KILL_SEED:
        raise SystemExit("a fault injected: the compute thread ends")
    return _append(self, token_id, logprob)


if __name__ == "__main__":
    SampleOutputProcessor.append = append
    sys.exit(main(["serve", *sys.argv[1:]]))
