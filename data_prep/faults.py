"""Fault points for the fault-injection tests: kill or pause the process at a named moment.

`LLMCORE_FAULT=POINT[:N][:pause]`: the N-th time (default 1) the code reaches `fault_point(POINT)`,
the process kills itself with SIGKILL (what `kill -9` does), or with `:pause` writes its pid to
`$LLMCORE_FAULT_READY` (when set) and sleeps, so a test can kill it from outside (workers included).
Unset (always, outside tests), a point costs one dict lookup.

Points: `prep:shard` (a shard file was opened), `prep:chunk` (a block was written),
`prep:install` (the temp dir is complete, before it is renamed into place),
`tokenizer:install` (likewise for `tokenizer train`).
"""

from __future__ import annotations

import os
import signal
import time

_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("LLMCORE_FAULT")
    if not spec or not spec.startswith(name):
        return
    parts = spec.split(":")
    point = ":".join(parts[:2])
    if point != name:
        return
    rest = parts[2:]
    pause = "pause" in rest
    nth = next((int(p) for p in rest if p.isdigit()), 1)
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if _COUNTS[name] != nth:
        return
    if pause:
        ready = os.environ.get("LLMCORE_FAULT_READY")
        if ready:
            with open(ready, "w") as f:
                f.write(str(os.getpid()))
        while True:
            time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)
