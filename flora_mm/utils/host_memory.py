"""Peak host memory (resident set) of this process, per phase of a run.

``peak_rss()`` reads the kernel's high-water mark of the resident set (``VmHWM`` in
``/proc/self/status``); ``reset_peak_rss()`` restarts it from the current RSS (writing ``5`` to
``/proc/self/clear_refs``, Linux >= 4.0), so each phase (start, load, save) gets its own peak.
``resource.getrusage(...).ru_maxrss`` cannot be reset, and psutil is no dependency here: the
two /proc files are all it would read. Where /proc is missing (not Linux) the functions fall
back to ``ru_maxrss`` and say so (``resettable=False``).

    from flora_mm.utils.host_memory import HostMemoryRecorder
    rec = HostMemoryRecorder()          # resets the peak
    ...build, shard, load...
    rec.record('start')                 # {'phase': 'start', 'peak_rss_mib': ..., 'rss_mib': ...}
    rec.save('work_dir/host_memory_rank0.json')
"""
from __future__ import annotations

import json
import os
import resource
import sys

_STATUS = '/proc/self/status'
_CLEAR_REFS = '/proc/self/clear_refs'
_RESET_SLACK_KIB = 4096  # what the interpreter may touch between the write and the read


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS, encoding='ascii') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])  # "VmHWM:   123456 kB"
    except OSError:
        return None
    return None


def _ru_maxrss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == 'darwin' else peak  # bytes on macOS, KiB on Linux


def peak_rss() -> int:
    """Peak resident set size of this process since start or the last reset, in bytes."""
    kib = _status_kib('VmHWM')
    return (kib if kib is not None else _ru_maxrss_kib()) * 1024


def current_rss() -> int:
    """Current resident set size of this process, in bytes (0 where /proc is missing)."""
    kib = _status_kib('VmRSS')
    return (kib or 0) * 1024


def reset_peak_rss() -> bool:
    """Restart the peak from the current RSS; False where the kernel does not allow it.

    Some sandboxes (gVisor, some container runtimes) accept the write and leave ``VmHWM``
    alone, so the reset counts only where the peak afterwards is back at the current RSS."""
    try:
        with open(_CLEAR_REFS, 'w', encoding='ascii') as f:
            f.write('5')
    except OSError:
        return False
    peak, rss = _status_kib('VmHWM'), _status_kib('VmRSS')
    # the RSS may grow between the write and the read, never shrink below a fresh peak
    return peak is not None and rss is not None and peak <= rss + _RESET_SLACK_KIB


class HostMemoryRecorder:
    """Peak RSS per phase: ``record(phase)`` stores the peak since the previous record (or the
    recorder's creation) and resets it for the next phase."""

    def __init__(self, reset: bool = True) -> None:
        # None: the first phase's peak counts from the process's start (``reset=False``), not
        # a failed reset; it becomes True / False with the first reset
        self.resettable = reset_peak_rss() if reset else None
        self.phases: list[dict] = []

    def record(self, phase: str, reset: bool = True, **extra) -> dict:
        """Store the peak since the previous record under ``phase`` (``extra``: more fields of
        the entry, JSON-serialisable) and, with ``reset``, restart it for the next phase."""
        entry = dict(phase=phase, peak_rss_mib=round(peak_rss() / 2**20, 1),
                     rss_mib=round(current_rss() / 2**20, 1), resettable=self.resettable)
        entry.update(extra)
        self.phases.append(entry)
        if reset:
            self.resettable = reset_peak_rss() and self.resettable is not False
        return entry

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(self.phases, f, indent=1)
