"""The consistent-hash ring of session ids onto workers, and bounded-load placement.

The ring (uhashring's md5 ring, 160 vnodes per worker) holds the workers that may take new
sessions: live, breaker not open, not draining. A worker's points depend on its name only, so
adding or removing a worker moves only the keys of that worker.

A new session goes to the first worker of its ring walk whose in-flight linkings stay within
``ceil(bound * average)`` after the placement ("consistent hashing with bounded loads",
Mirrokni et al.; HAProxy's ``hash-balance-factor``); a full worker sends it on down the walk.
"""

from __future__ import annotations

import math
import random
import uuid
from bisect import bisect
from collections.abc import Iterable, Mapping, Sequence

from uhashring import HashRing

VNODES = 160
SAMPLE_SIZE = 10_000


def sample_keys(n: int = SAMPLE_SIZE, *, seed: int = 4) -> list[str]:
    """A fixed sample of uuid keys: each worker's ring share is the fraction that maps to it."""
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


class Ring:
    def __init__(self, *, vnodes: int = VNODES, sample: Sequence[str] | None = None) -> None:
        self._ring = HashRing(nodes=[], vnodes=vnodes)
        self.vnodes = vnodes
        self._nodes: set[str] = set()
        self._sample = sample
        self.sample_size = len(sample) if sample is not None else SAMPLE_SIZE
        self._sample_hashes: list[int] | None = None
        self._shares: dict[str, float] | None = None

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(self._nodes)

    def sync(self, names: Iterable[str]) -> bool:
        """Make the ring hold exactly ``names``; only the difference is added or removed."""
        wanted = set(names)
        if wanted == self._nodes:
            return False
        for name in sorted(self._nodes - wanted):
            self._ring.remove_node(name)
        for name in sorted(wanted - self._nodes):
            self._ring.add_node(name)
        self._nodes = wanted
        self._shares = None
        return True

    def owner(self, key: str) -> str | None:
        if not self._nodes:
            return None
        node: str = self._ring.get_node(key)
        return node

    def walk(self, key: str) -> list[str]:
        """Every worker once, clockwise from the key's point: its home first, then the failovers."""
        if not self._nodes:
            return []
        return [str(n) for n in self._ring.iterate_nodes(key)]

    def shares(self) -> dict[str, float]:
        """Each worker's fraction of the fixed key sample (computed once per ring change)."""
        if self._shares is None:
            self._shares = self._compute_shares()
        return dict(self._shares)

    def _compute_shares(self) -> dict[str, float]:
        if not self._nodes:
            return {}
        if self._sample_hashes is None:
            keys = self._sample if self._sample is not None else sample_keys()
            self._sample_hashes = [int(self._ring.get_key(k)) for k in keys]
        points: list[tuple[int, str]] = self._ring.get_points()
        positions = [p for p, _ in points]
        counts = dict.fromkeys(self._nodes, 0)
        for h in self._sample_hashes:
            i = bisect(positions, h)
            counts[points[i if i < len(points) else 0][1]] += 1
        total = len(self._sample_hashes) or 1
        return {name: round(count / total, 4) for name, count in counts.items()}


def load_cap(total: int, workers: int, bound: float) -> int:
    """The most sessions a worker may carry once one more is placed: ``bound`` times the mean, rounded
    down — but never below the mean rounded up, so that some worker always has room."""
    mean = (total + 1) / max(1, workers)
    return max(1, math.ceil(mean), math.floor(bound * mean))


def place(
    walk: Sequence[str], loads: Mapping[str, int], bound: float, warm: Mapping[str, int] | None = None
) -> list[str]:
    """The walk reordered for a new session: the first worker with room that has a warm browser
    (its QR is on screen already), else the first with room, then the rest in walk order.

    Some worker always has room: if all were at the cap, the total would exceed itself."""
    if not walk:
        return []
    cap = load_cap(sum(loads.get(n, 0) for n in walk), len(walk), bound)
    roomy = [i for i, name in enumerate(walk) if loads.get(name, 0) + 1 <= cap]
    if not roomy:  # pragma: no cover - unreachable, see above
        return list(walk)
    first = next((i for i in roomy if (warm or {}).get(walk[i], 0) > 0), roomy[0])
    return [walk[first], *walk[first + 1 :], *walk[:first]]
