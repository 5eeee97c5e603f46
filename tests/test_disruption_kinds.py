"""Each kind of disruption is one class, found by its kind: nothing switches on kind names."""

from __future__ import annotations

import networkx as nx

from sim.disruptions import ACTIONS, DISRUPTION_KINDS, choose_targets, parse_disruption
from sim.disruptions.kinds import GraphHit, UndoAction, action_for


def test_every_kind_has_exactly_one_action() -> None:
    assert tuple(ACTIONS) == DISRUPTION_KINDS
    assert all(action.kind == kind for kind, action in ACTIONS.items())


def test_graph_hits_are_the_undoable_kinds() -> None:
    hits = {kind for kind, action in ACTIONS.items() if issubclass(action, GraphHit)}
    assert hits == {"crash", "region_outage", "link_failure", "partition"}
    undone = {kind for kind, action in ACTIONS.items() if issubclass(action, UndoAction)}
    assert undone == {"recover", "heal"}
    assert all(action.hits_graph == (kind in hits) for kind, action in ACTIONS.items())


def test_choose_targets_asks_the_kind() -> None:
    graph = nx.barabasi_albert_graph(30, 2, seed=1)
    spec = parse_disruption("crash:count=5,strategy=degree")
    action = action_for(spec, 0)
    assert isinstance(action, GraphHit)
    assert choose_targets(spec, graph, seed=3) == action.targets(graph, seed=3)
    assert len(choose_targets(spec, graph, seed=3).peers) == 5
