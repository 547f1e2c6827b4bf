"""Print the bad-input battery's tally: tries, clean, traceback, unnamed, silent, hang, lost, outside.

    python tests/battery/tally.py                 # every area
    python tests/battery/tally.py checkpoint data # some areas
    python tests/battery/tally.py -v              # one line per case

Against an older checkout (the cases use only the public surface)::

    PYTHONPATH=/path/to/old PICOMAML_ROOT=/path/to/old PICOMAML_BATTERY_CACHE=/tmp/old-cache \\
        python tests/battery/tally.py

``PICOMAML_BATTERY_HANG_S`` (default 120) is how long a case may go without an answer before it counts as
a hang.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = ("cases_library", "cases_cli", "cases_config", "cases_data", "cases_run_dir", "cases_containment",
           "cases_checkpoint", "cases_preemption")  # fmt: skip


def load_cases() -> None:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    for name in MODULES:
        importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("areas", nargs="*", help="areas to run (default: all)")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    p.add_argument("--mem-gb", type=float, default=12.0,
                   help="address-space cap of this process: a case that allocates without end fails instead of "
                        "taking the machine (default: %(default)s)")  # fmt: skip
    args = p.parse_args(argv)
    import resource

    cap = int(args.mem_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    load_cases()
    import torch
    from harness import AREAS, CASES, Outcome, Tally

    torch.set_num_threads(2)
    unknown = sorted(set(args.areas) - set(AREAS))
    if unknown:
        p.error(f"unknown areas {unknown}; known: {list(AREAS)}")
    tally, start = Tally(), time.monotonic()
    for case in CASES:
        if args.areas and case.area not in args.areas:
            continue
        with tempfile.TemporaryDirectory(prefix="battery-") as tmp:
            t0 = time.monotonic()
            try:
                outcome = case.fn(Path(tmp))
            except Exception as exc:  # noqa: BLE001 - a case's own setup failing is reported, not hidden
                outcome = Outcome("traceback", f"case setup: {type(exc).__name__}: {exc}")
        tally.add(case, outcome)
        if args.verbose or outcome.kind != "clean":
            print(f"{outcome.kind:<9} {case.id:<58} {time.monotonic() - t0:5.1f}s  {outcome.detail[:240]}", flush=True)
    print()
    print(tally.table())
    print(f"\n{time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
