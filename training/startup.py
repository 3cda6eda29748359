"""How long a run takes to start: from the process's start (what `accelerate launch` started) to the end of its first
optimizer step, by phase. Logged once and written to summary.json ("startup_seconds")."""

import os
import time


def process_age():
    """Seconds since this process started (Linux: /proc, 10 ms resolution), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: start time after boot
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class StartupClock:
    """Phases of the start, each from the end of the one before: `mark(name)` ends one."""

    def __init__(self):
        age = process_age()
        self.phases = {"python and imports": round(age, 2)} if age is not None else {}
        self.last = time.perf_counter()
        self.done = False

    def mark(self, phase):
        now = time.perf_counter()
        self.phases[phase] = round(now - self.last, 2)
        self.last = now

    def finish(self, phase):
        """Ends the last phase; returns the log line (once; None after)."""
        if self.done:
            return None
        self.mark(phase)
        self.done = True
        total = sum(self.phases.values())
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.phases.items())
        return f"start-up: {total:.1f} s to the end of the first optimizer step ({parts})"
