"""How the workers of a data stage (synth-videos, encode-latents) share one staging folder (DESIGN.md 3, one writer).

Shard k belongs to worker k % num_workers (ranks of a launch x `--shard i/n` jobs). Two processes with the same slot
(the same command started twice) own the same shards; each shard is claimed while it is made (locks.claim), so they
split the work instead of making it twice. A worker that is done waits while the missing shards are being made by
live processes and then commits with them (exactly one commits; the others find the artifact and print the same
path); a missing shard that nobody is making belongs to a worker that has not run yet (exit 0, it commits later),
unless it is one of ours whose maker died, which we then make.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, Sequence

from tmdcli.artifacts.locks import claim, claimed
from tmdcli.artifacts.store import Artifact, Staging, load_artifact
from tmdcli.runtime import interrupts


@contextlib.contextmanager
def making(staging: Staging, name: str) -> Iterator[bool]:
    """Claim file `name` of the staging folder while making it. Yields False (skip it) when it is already there or
    another live process is making it."""
    with claim(staging.path, name) as ours:
        yield ours and not staging.has(name)


def free_work(staging: Staging, names: Sequence[str], mine: Sequence[int]) -> list[int]:
    """Indices of our shards that are neither there nor being made by a live process."""
    return [k for k in mine if not staging.has(names[k]) and not claimed(staging.path, names[k])]


def _wait_for_launch(staging: Staging, shard_names: Sequence[str], rt, poll_s: float) -> None:
    """Rank 0 of a multi-rank launch waits for its launch's other ranks (they live and die with it)."""
    ws = rt.dist.world_size
    ours = range(rt.worker - rt.worker % ws, rt.worker - rt.worker % ws + ws)
    waiting = [n for k, n in enumerate(shard_names) if k % rt.num_workers in ours]
    told = False
    while not (staging.final_path / "manifest.json").is_file() and not all(staging.has(n) for n in waiting):
        if not told:
            print(f"waiting for the other ranks' shards in {staging.path}", file=sys.stderr)
            told = True
        time.sleep(poll_s)


def finish_when_complete(staging: Staging, shard_names: Sequence[str], rt, summarise: Callable[[], tuple[dict, dict]],
                         *, make: Callable[[list[int]], None], mine: Sequence[int], extra: Sequence[str] = (),
                         poll_s: float = 0.5) -> Artifact | None:
    """Make our free shards (`make(indices)`; it also makes a missing `extra` file), then commit when every shard
    and `extra` file is present; return None when the rest belongs to workers that have not run yet.

    In a multi-rank launch only rank 0 commits, after the shards of its launch's other ranks.
    """
    told = False
    while True:
        todo = free_work(staging, shard_names, mine)
        extra_free = [n for n in extra if not staging.has(n) and not claimed(staging.path, n)]
        if todo or extra_free:
            make(todo)
            continue  # look again: a shard may have been taken by another process meanwhile
        if rt.dist.world_size > 1:
            if not rt.dist.is_main:
                return None
            _wait_for_launch(staging, shard_names, rt, poll_s)
        if (staging.final_path / "manifest.json").is_file():
            return load_artifact(staging.final_path)
        missing = [n for n in [*shard_names, *extra] if not staging.has(n)]
        if not missing:
            interrupts.sigint_point("commit")
            stats, facts = summarise()
            return staging.commit(stats=stats, facts=facts, env={"num_workers": rt.num_workers})
        busy = [n for n in missing if claimed(staging.path, n)]
        if len(busy) < len(missing):
            print(f"{len(missing)} file(s) still missing (e.g. {missing[0]}): other workers make them",
                  file=sys.stderr)
            return None
        if not told:
            print(f"waiting for {len(busy)} shard(s) that other processes are making now (e.g. {busy[0]}), then "
                  f"committing", file=sys.stderr)
            told = True
        time.sleep(poll_s)
