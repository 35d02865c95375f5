"""List, and with --force remove, ashstream shared-memory segments in /dev/shm.

    python scripts/clean_shm.py            # list them, marking those of dead processes
    python scripts/clean_shm.py --force    # remove those whose owner process is gone

A pool sweeps segments of dead owners when it starts; this is for looking by hand.
"""

from __future__ import annotations

import argparse

from ashstream.engines.local.shm import SEGMENT_PREFIX, our_segments, sweep_stale_segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="remove segments of dead owners")
    args = parser.parse_args()
    if args.force:
        for name in sweep_stale_segments():
            print(f"removed {name}")
        return
    for name in our_segments():
        pid = name[len(SEGMENT_PREFIX) :].split("_")[0]
        print(f"{name}  (owner pid {pid})")


if __name__ == "__main__":
    main()
