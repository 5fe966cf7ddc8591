"""TEST-ONLY fault injection: stop this process dead at a named point of the converter.

``LLM_FLASH_MOE_TEST_KILL_AT=<point>:<n>[:<signal>]`` sends ``<signal>`` (default KILL; STOP is useful to
hold a converter still) to this process the ``n``-th time it reaches ``<point>``. The tests use it to
prove that an interrupted ``prepare`` resumes and ends byte-identical to an uninterrupted one. Points:

    download  between two chunks of a shard download (called by the tests' fake hub)
    unit      after one unit of expert work (one projection of one expert) was written
    journal   after the data was made durable, before the journal lines describing it are appended
    resident  after one module of the resident weights was written
    manifest  just before manifest.json is written
    finish    after manifest.json was written, before the model is registered and .partial removed

Unset (always, outside tests) each point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "LLM_FLASH_MOE_TEST_KILL_AT"
_reached = {}


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, n, *sig = spec.split(":")
    if where != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(n):
        os.kill(os.getpid(), getattr(signal, "SIG" + (sig[0] if sig else "KILL")))
