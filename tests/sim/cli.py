"""``python -m tests.sim``: one seed with its trace, or many schedules in parallel.

python -m tests.sim --seed 123                 # one schedule, trace printed
python -m tests.sim --schedules 100000 --seed-base 7 --jobs 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field

from .mutations import MUTATIONS, mutated
from .run import Result, Simulation, command
from .world import World


@dataclass
class Tally:
    """What a batch of schedules found."""

    explored: int = 0
    digests: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)  # reports of undocumented violations
    documented: list[str] = field(default_factory=list)  # explained by a Redis rollback
    harness: list[str] = field(default_factory=list)  # the harness failed, not the product
    seconds: float = 0.0

    def add(self, result: Result) -> None:
        self.explored += 1
        if result.harness_error:  # not explored: it does not count as a schedule
            self.harness.append(result.report())
            return
        self.digests.add(result.digest)
        if result.failed:
            self.failures.append(result.report())
        elif result.documented:
            self.documented.append(result.report())

    def merge(self, other: Tally) -> None:
        self.explored += other.explored
        self.digests |= other.digests
        self.failures += other.failures
        self.documented += other.documented
        self.harness += other.harness


def explore(seeds: range, *, stop_after: int = 0, progress: bool = False) -> Tally:
    """Run ``seeds`` on one world (this process); stop early after ``stop_after`` failures."""
    tally = Tally()
    started = time.perf_counter()
    with World() as world, Simulation(world) as sim:
        for n, seed in enumerate(seeds, 1):
            tally.add(sim.run(seed))
            if progress and n % 500 == 0:
                rate = n / (time.perf_counter() - started)
                print(f"  [{os.getpid()}] {n} schedules, {rate:.1f}/s", file=sys.stderr)
            if stop_after and len(tally.failures) >= stop_after:
                break
    tally.seconds = time.perf_counter() - started
    return tally


def _explore_args(args: tuple[range, int, bool]) -> Tally:
    return explore(args[0], stop_after=args[1], progress=args[2])


def explore_parallel(
    count: int, seed_base: int, jobs: int, *, stop_after: int = 0, progress: bool = False
) -> Tally:
    """``count`` schedules from ``seed_base`` on, split over ``jobs`` processes (each with
    its own servers)."""
    started = time.perf_counter()
    if jobs <= 1:
        tally = explore(
            range(seed_base, seed_base + count), stop_after=stop_after, progress=progress
        )
    else:
        parts = [range(seed_base + i, seed_base + count, jobs) for i in range(jobs)]
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            tallies = pool.map(_explore_args, [(p, stop_after, progress) for p in parts])
        tally = Tally()
        for t in tallies:
            tally.merge(t)
    tally.seconds = time.perf_counter() - started
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    parser.add_argument("--seed", type=int, help="run this one schedule and print its trace")
    parser.add_argument("--schedules", type=int, default=1000)
    parser.add_argument("--seed-base", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=3)  # latency-bound: 3 beat 2 on 2 cores
    parser.add_argument("--stop-after", type=int, default=0, help="stop after N violations")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--mutation",
        choices=sorted(MUTATIONS),
        help="switch this one fix off (tests/sim/mutations.py); runs in one process",
    )
    args = parser.parse_args(argv)
    if args.mutation:
        with mutated(args.mutation):
            return _main(args, jobs=1)
    return _main(args, jobs=args.jobs)


def _main(args: argparse.Namespace, *, jobs: int) -> int:
    if args.seed is not None:
        with World() as world, Simulation(world) as sim:
            result = sim.run(args.seed, verbose=not args.quiet)
        print(
            f"-- trace {result.digest[:12]}: {len(result.trace)} decisions, "
            f"{result.seconds * 1000:.0f} ms"
        )
        print(result.report())
        return 1 if result.failed else 0
    tally = explore_parallel(
        args.schedules, args.seed_base, jobs, stop_after=args.stop_after, progress=True
    )
    for report in tally.failures + tally.harness:
        print(report)
    print(
        f"schedules explored: {tally.explored}  distinct: {len(tally.digests)}  "
        f"violations: {len(tally.failures)}  documented (rollback): {len(tally.documented)}  "
        f"harness errors: {len(tally.harness)}  "
        f"time: {tally.seconds:.1f}s ({tally.explored / max(tally.seconds, 1e-9):.1f}/s)"
    )
    if tally.failures:
        seeds = [r.split(":", 1)[0] for r in tally.failures[:5]]
        print("reproduce: " + "; ".join(command(int(s.split()[1])) for s in seeds))
    return 1 if tally.failures else 0
