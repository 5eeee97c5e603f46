"""Attacks and robust protocols in the simulator: who is Byzantine, what they do, what it costs.

A scenario's ``[attack]`` table (:class:`AttackConfig`) names an attack of
:mod:`p2pfl.attacks` and how many peers carry it out:

```toml
[attack]
name = "alie"              # any name of p2pfl.attacks.ATTACKS
params = {}                # the attack's parameters (num_classes defaults to the dataset's)
fraction = 0.2             # or count = 8: Byzantine peers, drawn at random (attack.seed)
```

How each kind is carried out (the honest protocol code is never changed):

- **data** attacks (label flip, targeted flip, backdoor): the Byzantine peers' training
  batches go through the attack's transform (``TrainingExecutor.transforms``); they then
  run the protocol honestly with their poisoned models.
- **model** attacks (sign flip, Gaussian, scaling, ALIE, IPM, free rider): each Byzantine
  peer's protocol object is wrapped in :class:`p2pfl.attacks.ByzantineProtocol`, which
  replaces the model of its outgoing messages by the crafted vector. ALIE and IPM compute
  from the honest models they know: by default (``params.knowledge = "received"``) only
  those the attacker itself received from its neighbours -- not its fellow Byzantine
  peers' -- as a real node would; with ``params.knowledge = "omniscient"`` every model
  that honest peers sent in the round (seen through the engine), the papers' set-up. A
  rushing attacker sends ``delay`` seconds after its training ends, so that what it can
  know of the round is out by then (when nothing is yet, it uses the previous round's).
  A free rider holds no data and trains nothing; it sends back the model its round
  started from.
- **Sybil** attacks (``sybil_label_flip``): one adversary adds ``identities`` extra peers to
  the graph, each linked to ``attach`` honest peers drawn at random. The adversary holds
  one label-flipped data set (as large as an average honest peer's share) and one
  device's training; ``budget`` says how they are spread over its identities:
  ``"shared"`` (the default) -- one training a round on the whole set, which every
  identity sends (:class:`p2pfl.attacks.Collusion`; the identities run the same training
  from the same seed, so the simulator's K copies are one training's outcome), each
  identity declaring ``1/K`` of the samples; ``"split"`` -- each identity trains on its
  own disjoint ``1/K`` of the set, for ``local_steps // K`` steps (at least one), declares
  that part, and sends its own model. Either way the adversary's declared samples add
  up to the data it holds, whatever K (docs/attacks.md says why "shared" is the
  default). For a targeted flip (``params.source``/``target``) that data set holds only
  ``source`` samples, all relabelled ``target`` (the Sybil set-up of FoolsGold's
  evaluation). With ``fraction`` and no ``identities``, the count is chosen so that the
  identities make up that fraction of all peers: ``round(f * n / (1 - f))``; every
  metrics row says the real share (``malicious_share``: malicious peers / all peers).

``start_round``, ``stop_round``, ``period`` and ``duty`` schedule the attack
(:mod:`p2pfl.attacks.schedule`): outside its active rounds a Byzantine peer (or Sybil
identity) is honest -- clean batches, its own trained model sent at once, no isolation.
Each Byzantine peer then gets an attack object of its own, whose gate its wrapper sets to
the round of each training.

``isolate = true`` makes the Byzantine peers deaf: every model they receive is replaced by
their own last one, so their models stay purely poisoned (label flippers that never
mix with honest models; on by default for Sybil identities).

What is measured (added to every metrics row): accuracy columns cover **honest peers
only** (``acc_scope = "honest"``, ``malicious_peers`` says how many were left out), and
for targeted attacks the ``attack_success_rate`` over honest peers (mean, and max):

- label flip: the fraction of test samples predicted as their flipped label ``C - 1 - y``;
- targeted flip (and a Sybil flip with ``source``/``target``): the fraction of ``source``
  test samples predicted as ``target``;
- backdoor: the fraction of triggered test samples (true label not the target)
  predicted as the target.

Untargeted attacks have no success rate: their effect is the honest accuracy.

A Byzantine peer's protocol is wrapped by :func:`p2pfl.peer.wrap_attacker`, as a node
started with an ``[attack]`` wraps its own. (Robust protocols' set-up, Bristle's shared
extractor and probe sets, is the peer assembly's: :mod:`p2pfl.peer`.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import torch

from p2pfl.attacks import Attack, ByzantineProtocol, Collusion, needs_wrapper
from p2pfl.attacks.data_poisoning import Backdoor, LabelFlip, TargetedLabelFlip
from p2pfl.config import PLACEHOLDER_CLASSES
from p2pfl.learning import BatchSampler, predict
from p2pfl.peer import wrap_attacker
from p2pfl.protocols.base import Effect, Event, Protocol, Send
from p2pfl.protocols.wrapper import ProtocolWrapper
from sim.attack_config import AttackConfig  # re-exported: the [attack] table
from sim.errors import ScenarioError

if TYPE_CHECKING:
    from sim.engine import Engine
    from sim.runner import Simulation

__all__ = [
    "Adversary",
    "AdversaryPlan",
    "AttackConfig",
    "innermost",
    "plan_adversary",
    "sybil_budget",
]


# --------------------------------------------------------------------- planning (before peers exist)


@dataclass
class AdversaryPlan:
    """Which peers are Byzantine, decided before the protocols are built.

    ``sybils`` are extra graph nodes (appended after the ``n_honest`` original ones);
    ``byzantine`` are original peers turned malicious. Either may be empty.
    """

    config: AttackConfig
    attack: Attack | None
    n_graph: int
    byzantine: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sybils: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def malicious(self) -> np.ndarray:
        return np.concatenate([self.byzantine, self.sybils])

    def install(self, simulation: Simulation) -> Adversary | None:
        """Wire the attack into a built simulation (before it runs); ``None`` if no attack."""
        if self.attack is None or len(self.malicious) == 0:
            return None
        return Adversary(self, simulation)


def plan_adversary(scenario: Any, graph: nx.Graph) -> tuple[nx.Graph, AdversaryPlan]:
    """Choose the Byzantine peers and add Sybil identities to ``graph`` (a copy)."""
    config: AttackConfig = scenario.attack
    n = graph.number_of_nodes()
    num_classes = PLACEHOLDER_CLASSES
    attack = config.build(num_classes) if config.name != "none" else None
    plan = AdversaryPlan(config, attack, n)
    if attack is None:
        return graph, plan
    rng = np.random.default_rng([scenario.seed, config.seed, 0xB1D])
    if attack.sybil is not None:
        k = config.identities
        if k is None and config.fraction is not None:
            k = int(round(config.fraction * n / (1 - config.fraction)))
        if k is None:
            k = attack.sybil.identities
        if k > 0:
            graph = graph.copy()
            positions = nx.get_node_attributes(graph, "pos")
            attach = min(config.attach, n)
            for j in range(k):
                node = n + j
                targets = rng.choice(n, attach, replace=False)
                graph.add_node(node)
                if positions:  # geometric graphs: sit where the first victim is
                    graph.nodes[node]["pos"] = positions[int(targets[0])]
                graph.add_edges_from((node, int(t)) for t in targets)
        plan.sybils = np.arange(n, n + k, dtype=np.int64)
    else:
        count = config.count if config.count is not None else int(round((config.fraction or 0) * n))
        count = min(count, n)
        plan.byzantine = np.sort(rng.choice(n, count, replace=False)).astype(np.int64)
    return graph, plan


def sybil_budget(
    indices: np.ndarray, k: int, budget: str, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[int]]:
    """The data each of ``k`` identities trains on, and the samples each declares.

    ``"shared"``: every identity trains on all of ``indices`` and declares its part of
    them (``len // k``, the first ``len % k`` one more); ``"split"``: ``indices`` cut at
    random into ``k`` disjoint parts, each identity declaring its own. Declarations add up
    to ``len(indices)`` (with more identities than samples, "shared" declares 1 each: a
    protocol's weight cannot be 0). Raises ValueError when ``"split"`` has fewer samples
    than identities.
    """
    total = len(indices)
    if budget == "split":
        if total < k:
            raise ValueError(
                f"attack.budget = 'split': {k} identities cannot split {total} samples"
            )
        parts = [np.sort(part) for part in np.array_split(rng.permutation(indices), k)]
        return parts, [len(part) for part in parts]
    if budget != "shared":
        raise ValueError(f"attack.budget must be 'shared' or 'split', got {budget!r}")
    declared = [max(1, total // k + (j < total % k)) for j in range(k)]
    return [indices] * k, declared


def innermost(protocol: Protocol) -> Protocol:
    """The honest protocol object under any wrappers (Byzantine, codec)."""
    for _ in range(16):  # wrappers nest a few deep at most
        if not isinstance(protocol, ProtocolWrapper):
            break
        protocol = protocol.inner
    return protocol


# --------------------------------------------------------------------- the attack at run time


class _HonestModels:
    """The omniscient attacker's view: models honest peers sent, per round (last 3 kept)."""

    def __init__(self, engine: Engine, malicious: set[int], kinds: frozenset[str]) -> None:
        self.by_round: dict[int, dict[int, torch.Tensor]] = {}
        self.malicious = malicious
        self.kinds = kinds
        engine.on_handled(self._observe)

    def _observe(self, peer: int, event: Event, effects: list[Effect]) -> None:
        if peer in self.malicious or not effects:
            return
        for effect in effects:
            if isinstance(effect, Send) and effect.message.params is not None:
                message = effect.message
                if message.kind in self.kinds:
                    self.by_round.setdefault(message.round, {})[peer] = effect.message.params
        for old in sorted(self.by_round)[:-3]:
            del self.by_round[old]

    def __call__(self, round_: int) -> torch.Tensor | None:
        models = self.by_round.get(round_) or self.by_round.get(round_ - 1)
        if not models:
            return None
        return torch.stack([models[p].clone() for p in sorted(models)])


class Adversary:
    """The attack installed on a simulation; measures its success at every evaluation."""

    def __init__(self, plan: AdversaryPlan, simulation: Simulation) -> None:
        scenario = simulation.scenario
        dataset = simulation.dataset
        engine = simulation.engine
        self.plan = plan
        self.config = plan.config
        self.attack = attack = plan.config.build(dataset.num_classes)
        self.simulation = simulation
        self.malicious = np.sort(plan.malicious)
        malicious = {int(i) for i in self.malicious}
        self.honest = np.array([i for i in range(engine.n) if i not in malicious], dtype=np.int64)
        executor = engine.executor
        samplers = executor.samplers
        batch_size = scenario.data.batch_size

        budget = plan.config.budget or "shared"
        if len(plan.sybils):  # the adversary's one data set and training, over its identities
            self._fund_sybils(simulation, budget, batch_size)
        if not attack.trains:  # the free rider
            for i in self.malicious:
                samplers[int(i)] = None  # trains nothing: the executor hands the model back
        # a scheduled attack keeps per-peer state (the round its batches are for)
        scheduled = not attack.schedule.always
        attacks = {
            int(i): plan.config.build(dataset.num_classes) if scheduled else attack
            for i in self.malicious
        }
        for i in self.malicious:
            transform = attacks[int(i)].batch_transform
            if transform is not None:
                executor.transforms[int(i)] = transform

        isolate = plan.config.isolate if plan.config.isolate is not None else len(plan.sybils) > 0
        colluding = len(plan.sybils) > 0 and budget == "shared"
        if needs_wrapper(attack, isolate=isolate, colluding=colluding):
            from p2pfl.attacks import MODEL_KINDS

            knowledge = None  # "received": what each attacker's wrapper itself heard
            if attack.omniscient:
                knowledge = _HonestModels(engine, malicious, MODEL_KINDS)
            collusion = Collusion() if len(plan.sybils) and budget == "shared" else None
            allies = frozenset(simulation.peer_ids[int(i)] for i in self.malicious)
            jitter = attack.sybil.jitter if attack.sybil is not None else 0.0
            for i in self.malicious:
                engine.protocols[int(i)] = wrap_attacker(
                    engine.protocols[int(i)],
                    attacks[int(i)],
                    plan.config,
                    index=int(i),
                    seed=scenario.seed,
                    isolate=isolate,
                    n_total=engine.n,
                    n_byzantine=len(self.malicious),
                    knowledge=knowledge,
                    collusion=collusion,
                    jitter=jitter,
                )
                wrapped = engine.protocols[int(i)]
                if isinstance(wrapped, ByzantineProtocol):  # colluders' models are no honest ones
                    wrapped.allies = allies - {wrapped.peer_id}

        evaluator = simulation.evaluator
        sample = evaluator.peer_sample
        keep = self.honest if sample is None else np.intersect1d(sample, self.honest)
        evaluator.peer_sample = keep
        self._success = self._success_measure(
            evaluator.x_test, evaluator.y_test, dataset.num_classes
        )

    def _fund_sybils(self, simulation: Simulation, budget: str, batch_size: int) -> None:
        """Give the Sybil identities the adversary's one data set and one training, spread
        over them as ``budget`` says (module docstring), and the sample counts they declare."""
        plan, dataset, attack = self.plan, simulation.dataset, self.attack
        engine = simulation.engine
        sizes = simulation.data_sizes[: plan.n_graph]
        share = int(sizes[sizes > 0].mean()) if (sizes > 0).any() else batch_size
        rng = np.random.default_rng([simulation.scenario.seed, plan.config.seed, 0x5B1])
        pool = np.arange(len(dataset.y_train))
        if isinstance(attack.apply, TargetedLabelFlip):  # FoolsGold's set-up: 1s labelled 7
            pool = pool[dataset.train_labels == attack.apply.source]
        indices = np.sort(rng.choice(pool, min(share, len(pool)), replace=False))
        sybils = [int(s) for s in plan.sybils]
        try:
            parts, declared = sybil_budget(indices, len(sybils), budget, rng)
        except ValueError as error:
            raise ScenarioError(str(error)) from None
        seed = int(rng.integers(2**62))  # "shared": one seed, so K identical trainings
        for j, s in enumerate(sybils):
            if budget == "split":
                seed = int(rng.integers(2**62))
            engine.executor.samplers[s] = BatchSampler(parts[j], batch_size, seed)
            simulation.data_sizes[s] = declared[j]
            inner = innermost(engine.protocols[s])
            if budget == "split":  # one device's steps, split over the identities
                inner.local_steps = max(1, inner.local_steps // len(sybils))
            inner.declare_samples(declared[j])  # kept by protocols that weight by samples

    def _success_measure(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A function of a stack of models -> each one's attack success rate, if targeted."""
        trainer = self.simulation.trainer
        transform = self.attack.apply if self.attack.kind == "data" else None
        if isinstance(transform, LabelFlip):
            flipped = (num_classes - 1) - y
            return lambda models: (predict(trainer, models, x) == flipped).double().mean(dim=1)
        if isinstance(transform, TargetedLabelFlip):
            rows = y == transform.source
            xs, target = x[rows], transform.target
            return lambda models: (predict(trainer, models, xs) == target).double().mean(dim=1)
        if isinstance(transform, Backdoor):
            triggered, labels = transform.test_batch(x, y)
            return lambda models: (
                (predict(trainer, models, triggered) == labels).double().mean(dim=1)
            )
        return None

    def measure(self) -> dict[str, Any]:
        """Columns added to a metrics row (after the evaluator measured the honest peers)."""
        row: dict[str, Any] = {
            "acc_scope": "honest",
            "malicious_peers": int(len(self.malicious)),
            # the real share of malicious peers (Sybil identities among all peers)
            "malicious_share": len(self.malicious) / self.simulation.engine.n,
        }
        if self._success is None:
            return row
        engine = self.simulation.engine
        peers = self.simulation.evaluator.last_peers
        if not peers:
            row["attack_success_rate"] = float("nan")
            row["attack_success_max"] = float("nan")
            return row
        from sim.mixing import plain

        models = torch.stack([plain(engine.protocols[i].params) for i in peers])
        rates = self._success(models)
        row["attack_success_rate"] = float(rates.mean())
        row["attack_success_max"] = float(rates.max())
        return row
