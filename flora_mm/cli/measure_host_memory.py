"""Measured peak host RSS per rank of sharded training at start, load and save.

    python tools/measure_host_memory.py --out work_dirs/host_memory [--procs 2]
        [--methods flora full] [--starts gathered meta] [--save-formats full dcp]

See flora_mm/harness/host_memory.py (what runs and what is recorded) and docs/sharding.md
("Host memory").
"""
from __future__ import annotations

from flora_mm.harness.host_memory import main, parse_args

__all__ = ['main', 'parse_args']

if __name__ == '__main__':
    main()
