"""Disasters and disruptions in a simulation: declared in the scenario, fired in virtual time.

A scenario lists its disruptions as an array of tables::

    [[disruptions]]
    kind = "crash"            # crash | recover | link_failure | region_outage | partition
    at_round = 20             #   | heal | battery | churn | join | data_loss
    count = 8
    strategy = "degree"       # random | degree | betweenness
    recompute = true          # re-rank on the graph left after each loss (adaptive attack)
    among = "relays"

Each table is validated in :mod:`~sim.disruptions.config` (pydantic, a discriminated
union on ``kind``, unknown keys rejected), so a mistake is one line naming the key. Whom
a disruption takes out is chosen by the pure functions of :mod:`topologies.disruption`,
seeded by the scenario seed and the disruption's position in the list, so a scenario
replays exactly.

Peers are never told that a neighbour died: like a real node, they find out when a send
fails or a timeout fires (the engine turns sends to dead peers and over failed links
into ``SendFailed``). What a real node *does* see is a connection coming up: a peer that
recovers or joins dials the neighbours it knows, and a healed link reconnects its two
ends, so those raise ``PeerUp`` on both sides (the dialled peer one link latency later,
the dialler on the answer, one more latency later).

A peer can be down for several reasons at once (inside an outage region *and* churned
out): it comes back only when every reason is lifted, and never once its battery is empty.

The package, one job per module:

- :mod:`~sim.disruptions.config`: the ``[[disruptions]]`` tables (configuration only;
  :mod:`sim.scenario` imports it);
- :mod:`~sim.disruptions.kinds`: one class per kind, which picks its targets, fires and,
  where it applies, is undone; :data:`~sim.disruptions.kinds.ACTIONS` finds it by kind;
- :mod:`~sim.disruptions.runtime`: schedules the firings on a built simulation, keeps the
  bookkeeping the kinds share, measures and writes the results;
- :mod:`~sim.disruptions.battery`: battery drain in virtual time;
- :mod:`~sim.disruptions.targets`: pools, checks and seeds;
- :mod:`~sim.disruptions.preview`: the command line's one-line disruptions.

Names load on first use (PEP 562): :mod:`sim.scenario` imports the configuration module
without loading the runtime that carries disruptions out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from topologies.lazy import lazy_exports

_EXPORTS = {
    "BatteryDrain": "sim.disruptions.config",
    "Churn": "sim.disruptions.config",
    "Crash": "sim.disruptions.config",
    "DISRUPTION_KINDS": "sim.disruptions.config",
    "DataLoss": "sim.disruptions.config",
    "Disruption": "sim.disruptions.config",
    "DisruptionList": "sim.disruptions.config",
    "Heal": "sim.disruptions.config",
    "Join": "sim.disruptions.config",
    "LinkFailure": "sim.disruptions.config",
    "Partition": "sim.disruptions.config",
    "Recover": "sim.disruptions.config",
    "RegionOutage": "sim.disruptions.config",
    "ACTIONS": "sim.disruptions.kinds",
    "DisruptionAction": "sim.disruptions.kinds",
    "choose_targets": "sim.disruptions.kinds",
    "parse_disruption": "sim.disruptions.preview",
    "preview_disruption": "sim.disruptions.preview",
    "Change": "sim.disruptions.runtime",
    "DisruptionRuntime": "sim.disruptions.runtime",
    "install_disruptions": "sim.disruptions.runtime",
    "Targets": "sim.disruptions.targets",
    "DisruptionError": "sim.errors",
}

__all__ = [
    "ACTIONS",
    "DISRUPTION_KINDS",
    "BatteryDrain",
    "Change",
    "Churn",
    "Crash",
    "DataLoss",
    "Disruption",
    "DisruptionAction",
    "DisruptionError",
    "DisruptionList",
    "DisruptionRuntime",
    "Heal",
    "Join",
    "LinkFailure",
    "Partition",
    "Recover",
    "RegionOutage",
    "Targets",
    "choose_targets",
    "install_disruptions",
    "parse_disruption",
    "preview_disruption",
]

if TYPE_CHECKING:
    from sim.disruptions.config import (
        DISRUPTION_KINDS,
        BatteryDrain,
        Churn,
        Crash,
        DataLoss,
        Disruption,
        DisruptionList,
        Heal,
        Join,
        LinkFailure,
        Partition,
        Recover,
        RegionOutage,
    )
    from sim.disruptions.kinds import ACTIONS, DisruptionAction, choose_targets
    from sim.disruptions.preview import parse_disruption, preview_disruption
    from sim.disruptions.runtime import Change, DisruptionRuntime, install_disruptions
    from sim.disruptions.targets import Targets
    from sim.errors import DisruptionError


if not TYPE_CHECKING:  # a type checker reads the imports above (and so catches a typo)
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
