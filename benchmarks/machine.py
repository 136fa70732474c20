"""The machine's own share of a measured lateness: an idle process timing 10 ms sleeps.

A benchmark starts :func:`start_lag_probe` beside a round and reads :func:`lag_p99_ms`
after it: what an idle process overshot its timers by meanwhile (other processes, the
kernel), next to what the measured server overshot its own by.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import select, sys, time
lags = []
while not select.select([sys.stdin], [], [], 0)[0]:
    t = time.monotonic()
    time.sleep(0.01)
    lags.append((time.monotonic() - t - 0.01) * 1000)
lags.sort()
print(lags[min(len(lags) - 1, int(len(lags) * 0.99))])
"""


def start_lag_probe() -> subprocess.Popen[str]:
    """Start the idle process; it times 10 ms sleeps until :func:`lag_p99_ms`."""
    return subprocess.Popen(
        [sys.executable, "-c", PROBE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def lag_p99_ms(probe: subprocess.Popen[str]) -> float:
    """Stop the probe: the p99 of its timers' overshoot, ms."""
    out, _ = probe.communicate("\n", timeout=30)
    return float(out)
