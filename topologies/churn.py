"""Churn traces: when each peer leaves and comes back.

Each peer starts online and alternates sessions and downtimes of exponential length
(memoryless, the usual churn model). Peer ``i`` draws from its own child of
``numpy.random.SeedSequence(seed)``, so its trace does not change when ``n`` does.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

from topologies.errors import TopologyError

__all__ = ["ChurnEvent", "churn_trace"]


class ChurnEvent(NamedTuple):
    """Peer ``peer`` leaves or joins at virtual time ``time``."""

    time: float
    peer: int
    kind: Literal["leave", "join"]


def churn_trace(
    n: int,
    *,
    seed: int = 0,
    horizon: float,
    mean_session: float,
    mean_downtime: float,
    peers: list[int] | None = None,
) -> list[ChurnEvent]:
    """Leave/join events strictly before ``horizon``, sorted by ``(time, peer)``.

    Every churning peer starts online, so its events alternate ``leave``, ``join``,
    ``leave``... ``peers`` restricts churn to some peers (default: ``0..n-1``), e.g. to
    keep a few stable bootstrap peers.
    """
    if horizon < 0 or mean_session <= 0 or mean_downtime <= 0:
        raise TopologyError("churn needs horizon >= 0 and positive mean_session and mean_downtime")
    churning = list(range(n)) if peers is None else sorted(set(peers))
    if any(not 0 <= p < n for p in churning):
        raise TopologyError(f"churning peers must be in [0, {n})")
    children = np.random.SeedSequence(seed).spawn(n)
    events: list[ChurnEvent] = []
    for peer in churning:
        rng = np.random.default_rng(children[peer])
        t, online = 0.0, True
        while True:
            t += rng.exponential(mean_session if online else mean_downtime)
            if t >= horizon:
                break
            events.append(ChurnEvent(float(t), peer, "leave" if online else "join"))
            online = not online
    events.sort(key=lambda e: (e.time, e.peer))
    return events
