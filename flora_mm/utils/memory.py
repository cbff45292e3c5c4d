"""Peak host memory (RSS) of this process, resettable, for measuring one phase (a save, the
start). Linux only: reads ``VmHWM`` from ``/proc/self/status``; writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS (kernel >= 4.0). Written by hand:
neither torch nor mmengine exposes a resettable host peak (``resource.getrusage``'s
``ru_maxrss`` cannot be reset)."""
from __future__ import annotations


def _status_kib(field: str) -> int | None:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int | None:
    """Peak resident set size since the process started or :func:`reset_peak_rss` (bytes);
    None where ``/proc`` has no ``VmHWM``."""
    kib = _status_kib('VmHWM')
    return None if kib is None else kib * 1024


def current_rss_bytes() -> int | None:
    kib = _status_kib('VmRSS')
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS; False where the kernel does not allow it."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        return False
    return True
