"""Running the batched rounds on an accelerator: device choice and the device kernels.

What lives on the device and what does not. The expensive part of a batched round is
arithmetic on ``(N, d)`` stacks: the training steps of every peer and the mixing product
``W @ T``. Both are device-generic torch here: the stack, the training data (``x``, ``y``)
and the mixing matrix (a sparse CSR tensor) are moved to the device once; per round only
the batch indices travel (``N x batch`` int64, a few hundred KB at 10,000 peers) and,
where a caller reads them, per-peer losses. Protocol messages stay where the simulator's
protocols expect them (CPU tensors): the boundary is :meth:`DeviceRounds.params`, which
hands out CPU copies of the rows asked for, nothing else crosses per round.

``resolve_device`` turns the configured name into a ``torch.device`` or a one-line
configuration error (``sim.device = "cuda"`` on a machine without CUDA).

``DeviceRounds`` is D-PSGD with fixed mixing weights in rounds on one device: the same
computation as the simulator's batched path (train every peer from its mixed row, by
chunks; mix with the Metropolis-Hastings matrix), minus the event loop. On the CPU it
reproduces the simulator's models within float tolerance (torch's sparse product sums in
its own order, scipy's in another); on CUDA within a looser one (other kernels).

The whole simulator on a device (``sim.device = "cuda"``) uses the rest of this module:
``DeviceArena`` (the row arena, its blocks torch tensors on the device) and ``DeviceMixer``
(the deferred means as ``torch`` sparse products there); training and evaluation are the
batched trainer's and ``p2pfl.learning.evaluate``, given data on the device
(``LocalTrainer.on_device``). The executor (``sim.training``) and the evaluator
(``sim.metrics``) pick them when given a device; ``device_scope_error`` says which
scenarios they cover (see docs/gpu.md). Any of them runs on ``torch.device("cpu")`` as well: that is how the device
path is tested on a machine without a GPU (``build_simulation(..., device_path=True)``).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from p2pfl.learning import BatchSampler, LocalTrainer
from p2pfl.model import unflatten
from sim.errors import ScenarioError
from sim.mixing import Mixer, PendingMix, PendingStack

if TYPE_CHECKING:
    from sim.scenario import Scenario

#: devices a scenario may name (``sim.device``)
DEVICES = ("cpu", "cuda")


def resolve_device(name: str, *, key: str = "sim.device") -> torch.device:
    """``name`` as a torch device, or a one-line ``ScenarioError`` saying why not."""
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise ScenarioError(f"{key} = {name!r}: expected one of {', '.join(DEVICES)} (optionally 'cuda:N')")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ScenarioError(f"{key} = {name!r}: CUDA is not available on this machine (torch {torch.__version__})")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ScenarioError(f"{key} = {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ScenarioError(f"{key} = {name!r}: {error}") from None


def peak_device_bytes(device: torch.device) -> int:
    """Peak memory torch allocated on ``device`` since the last reset (0 for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return 0


class DeviceRounds:
    """Train-then-mix rounds for ``N`` peers with the whole stack on ``device``.

    ``trainer`` must be a Flatten/Linear/ReLU stack (the batched kernel of
    ``LocalTrainer``); ``samplers`` give each peer's batches exactly as the simulator's
    executor draws them; ``weights`` is the ``(N, N)`` mixing matrix (scipy sparse).
    Two ``(N, d)`` stacks on the device (double buffering) and one chunk of mixed rows:
    about two rows per peer of device memory.
    """

    def __init__(
        self,
        trainer: LocalTrainer,
        samplers: Sequence[BatchSampler],
        weights: Any,
        start: torch.Tensor,
        *,
        device: torch.device | str = "cpu",
        steps: int = 1,
        chunk: int | None = None,
    ) -> None:
        self.device = torch.device(device) if isinstance(device, str) else device
        stacked = trainer.stacked_kernel
        if stacked is None:
            raise ScenarioError(
                "sim.device: the device path trains Flatten/Linear/ReLU models only (model.name = 'mlp' or 'logreg')"
            )
        self.kernel = stacked
        self.trainer = trainer
        self.samplers = list(samplers)
        self.steps = steps
        n, dim = len(self.samplers), trainer.dim
        self.n, self.dim = n, dim
        self.chunk = chunk or trainer.peers_per_call(trainer.batch_size)
        self.x = trainer.x.to(self.device)
        self.y = trainer.y.to(self.device)
        csr = weights.tocsr().astype(np.float32)
        self.weights = _csr(
            torch.from_numpy(csr.indptr.astype(np.int64)),
            torch.from_numpy(csr.indices.astype(np.int64)),
            torch.from_numpy(csr.data),
            csr.shape,
            self.device,
        )
        self.blocks = [(a, min(a + self.chunk, n)) for a in range(0, n, self.chunk)]
        self.rows = [self.weights_rows(a, b) for a, b in self.blocks]
        self.stacks = [torch.empty((n, dim), dtype=torch.float32, device=self.device) for _ in range(2)]
        self.start = start.to(self.device, torch.float32)
        self.done = 0
        self.losses = torch.zeros(n, dtype=torch.float32, device=self.device)

    def weights_rows(self, first: int, stop: int) -> torch.Tensor:
        """Rows ``first:stop`` of the mixing matrix, as their own CSR tensor."""
        crow = self.weights.crow_indices()
        lo, hi = int(crow[first]), int(crow[stop])
        return _csr(
            crow[first : stop + 1] - lo,
            self.weights.col_indices()[lo:hi],
            self.weights.values()[lo:hi],
            (stop - first, self.n),
            self.device,
        )

    def run(self, rounds: int) -> None:
        """``rounds`` rounds: each peer trains from its mixed row (the start model in the
        first round), the results become the next round's stack."""
        for _ in range(rounds):
            out = self.stacks[self.done % 2]
            trained = self.stacks[(self.done - 1) % 2] if self.done else None
            for (a, b), rows in zip(self.blocks, self.rows, strict=True):
                if trained is None:
                    source = self.start.expand(b - a, self.dim).contiguous()
                else:
                    source = torch.sparse.mm(rows, trained)
                self._train(source, out[a:b], a, b)
            self.done += 1

    def params(self, peers: Sequence[int]) -> torch.Tensor:
        """The models of ``peers`` now (their last round's mix), as a CPU tensor: the one
        place rows leave the device."""
        if not self.done:
            return self.start.expand(len(peers), self.dim).cpu()
        trained = self.stacks[(self.done - 1) % 2]
        index = torch.as_tensor(list(peers), dtype=torch.int64)
        out = []
        for a, b in self.blocks:
            inside = index[(index >= a) & (index < b)]
            if len(inside):
                mixed = torch.sparse.mm(self.weights_rows(a, b), trained)
                out.append((inside, mixed[(inside - a).to(self.device)]))
        result = torch.empty((len(peers), self.dim), dtype=torch.float32)
        order = {int(p): i for i, p in enumerate(peers)}
        for inside, values in out:
            result[[order[int(p)] for p in inside]] = values.cpu()
        return result

    def _train(self, source: torch.Tensor, target: torch.Tensor, a: int, b: int) -> None:
        src = unflatten(source, self.trainer.layout)
        dst = unflatten(target, self.trainer.layout)
        batch = self.trainer.batch_size
        for _ in range(self.steps):
            idx = np.concatenate([s.next_batch() for s in self.samplers[a:b]])
            index = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(self.device)
            x = self.x.index_select(0, index).view(b - a, batch, *self.trainer.input_shape)
            y = self.y.index_select(0, index).view(b - a, batch)
            loss = self.kernel.step(
                src, dst, x, y, lr=self.trainer.lr, weight_decay=self.trainer.weight_decay
            )
            self.losses[a:b] = loss
            src = dst


def _csr(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """A CSR tensor on ``device`` (built from valid scipy CSR: no invariant checks; torch's
    note that sparse CSR is a beta feature is silenced, the products used are stable)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, device=device, check_invariants=False)


# ---------------------------------------------------------------- the whole simulator

#: what the device path covers, for ``device_scope_error``'s one line
DEVICE_PROTOCOLS = ("dpsgd", "epidemic", "gossip")
DEVICE_SCOPE = (
    "the device path runs protocols dpsgd, epidemic and gossip with aggregator 'mean', "
    "Flatten/Linear/ReLU models (mlp, logreg), sim.backend = 'batched', protocol.codec = 'fp32', "
    "no [attack] and no protocol.shared_start; use sim.device = 'cpu' for the rest"
)
#: on an accelerator a batched call may hold this many times the CPU's activation budget
#: (``p2pfl.learning.trainer.ACTIVATION_BUDGET``, sized for a CPU cache): 256 MiB of floats
DEVICE_CHUNK_FACTOR = 16


def device_scope_error(scenario: Scenario) -> str | None:
    """Why ``scenario`` cannot run on the device path (one line), or ``None``.

    Everything refused here would put CPU and device tensors into one operation (a robust
    aggregator's or an attack's arithmetic, a codec's numpy encoding, a zeroth-order
    protocol's loss evaluations, the per-peer trainer): rather than behaviour nobody ran
    on CUDA, the scenario is refused before it starts, naming what the path covers.
    """
    protocol = scenario.protocol
    found = []
    if scenario.sim.backend != "batched":
        found.append(f"sim.backend = {scenario.sim.backend!r}")
    if protocol.name not in DEVICE_PROTOCOLS:
        found.append(f"protocol {protocol.name!r}")
    if protocol.aggregator != "mean" or protocol.aggregator_params:
        found.append(f"protocol.aggregator = {protocol.aggregator!r}")
    if protocol.codec.name != "fp32":
        found.append(f"protocol.codec = {protocol.codec.name!r}")
    if protocol.shared_start is not None:
        found.append("protocol.shared_start")
    if scenario.attack.name != "none":
        found.append(f"attack {scenario.attack.name!r}")
    if not found:
        return None
    return f"sim.device = {scenario.sim.device!r}: {', '.join(found)} not supported; {DEVICE_SCOPE}"


def trainer_scope_error(trainer: LocalTrainer, scenario: Scenario) -> str | None:
    """Why ``trainer``'s model cannot train on the device path (one line), or ``None``."""
    if trainer.stacked_kernel is not None:
        return None
    return f"sim.device = {scenario.sim.device!r}: model {scenario.model.name!r} not supported; {DEVICE_SCOPE}"


def device_chunk(trainer: LocalTrainer, device: torch.device) -> int:
    """Peers per batched call on ``device``: the CPU's choice on the CPU (its cache), a
    larger one on an accelerator, where one call per few thousand peers keeps it busy."""
    per_call = trainer.peers_per_call(trainer.batch_size)
    return per_call if device.type == "cpu" else per_call * DEVICE_CHUNK_FACTOR


class DeviceArena:
    """``RowArena``'s interface with every block a tensor of its own on ``device``.

    Why not blocks carved out of a few large buffers, as on the CPU: the arena learns that
    a block is free from a weak reference to the object that owns its memory. On the CPU
    that is a numpy view, which torch keeps alive as long as any tensor uses its memory;
    but a torch view of a torch tensor keeps only the *root* tensor alive (``view._base``),
    never the intermediate view. A block that is its own root is alive exactly as long as
    a row of it, or anything viewing such a row, is (``tests/test_sim_device_path.py``
    checks this). Fresh tensors cost little on CUDA: the caching allocator hands a dead
    block's memory out again without asking the driver.

    ``buffers`` maps a block's id to the block while it lives (a ``WeakValueDictionary``);
    every block starts at row 0 of its own "buffer". A mean whose rows lie in k blocks
    costs k products, so the executor takes one block for all the jobs it trains together
    (normally a round's) and trains it chunk by chunk. ``capacity`` is the rows the arena
    may hold before it asks ``reclaim`` (``Mixer.settle_spent``, as ``RowArena`` does
    before it opens a new buffer) to let go of rows held for convenience.
    """

    def __init__(self, dim: int, capacity: int, device: torch.device) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.dim = dim
        self.capacity = capacity
        self.device = device
        self.buffers: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._next_id = 0
        self.allocated = 0  # blocks created over the arena's life
        self.peak_rows = 0  # the most rows alive at once (after a take)
        self.reclaim: Callable[[], int] | None = None

    def take(self, rows: int, *, at_least: int | None = None) -> tuple[int, int, torch.Tensor]:
        """A block of ``rows`` rows: ``(block id, 0, tensor (rows, dim) on the device)``.

        Always whole (``at_least`` is accepted for ``RowArena``'s interface): a fresh
        tensor has no holes to fill.
        """
        if self.reclaim is not None and self.rows_in_use + rows > self.capacity:
            self.reclaim()
        block = torch.empty((rows, self.dim), dtype=torch.float32, device=self.device)
        ident = self._next_id
        self._next_id += 1
        self.buffers[ident] = block
        self.allocated += 1
        self.peak_rows = max(self.peak_rows, self.rows_in_use)
        return ident, 0, block

    def in_use(self, ident: int) -> bool:
        """Whether any tensor still views block ``ident``."""
        return ident in self.buffers

    @property
    def rows_in_use(self) -> int:
        """Rows of live blocks."""
        return sum(block.shape[0] for block in list(self.buffers.values()))

    @property
    def nbytes(self) -> int:
        return 4 * self.dim * self.rows_in_use


class DeviceMixer(Mixer):
    """``Mixer`` with its values on the arena's device and its products ``torch`` sparse
    CSR products there.

    The bookkeeping (pending, spent and settled mixes) and the gathering of a chunk's
    row keys and weights are the base class's; what differs is where values are kept
    (``_empty``: a chunk, a settle block, the executor's scratch are device tensors) and
    how one product runs (``_product``: the chunk's CSR matrix, a few KB built on the CPU,
    is copied to the device and multiplied there into ``out``). Products are accumulated
    in block order on zeros, each output row reading its own row of the matrix only, so a
    mix computed alone or in a chunk gets the same sums.
    """

    def __init__(self, arena: DeviceArena, *, chunk: int = 256) -> None:
        super().__init__(arena, chunk=chunk)  # type: ignore[arg-type]  # RowArena's interface
        self.device_arena = arena
        self.device = arena.device
        # the value-less tensors report the device their values will be on (the base
        # class makes them CPU-shaped wrappers): ``mix.device`` tells the truth
        device = self.device

        def wrapper(cls: type, shape: tuple[int, ...]) -> Any:
            return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32, device=device)

        bound = {"_mixer": self, "_dim": self.dim, "__module__": Mixer.__module__, "_new": staticmethod(wrapper)}
        self.stack_type = type("PendingStack", (PendingStack,), bound)
        self.mix_type = type("PendingMix", (PendingMix,), bound)

    def _empty(self, rows: int) -> torch.Tensor:
        return torch.empty((rows, self.dim), dtype=torch.float32, device=self.device)

    def _product(
        self, ident: int, indptr: np.ndarray, columns: np.ndarray, weights: np.ndarray, out: torch.Tensor
    ) -> None:
        source = self.device_arena.buffers[ident]
        matrix = _csr(
            torch.from_numpy(indptr),
            torch.from_numpy(np.ascontiguousarray(columns)),
            torch.from_numpy(np.ascontiguousarray(weights)),
            (len(indptr) - 1, source.shape[0]),
            self.device,
        )
        out.addmm_(matrix, source)


def simulation_device(scenario: Scenario, *, force: bool = False) -> torch.device | None:
    """The device a simulation keeps its rows on: ``None`` for the default numpy/scipy
    path (``sim.device = "cpu"``), else the resolved device, after checking that the
    scenario is one the device path covers (one-line ``ScenarioError`` otherwise).

    ``force`` takes the device path on the CPU too (``sim.device = "cpu"``): the same
    torch code as on CUDA, run where no GPU is; for tests and benchmarks.
    """
    name = scenario.sim.device
    if name == "cpu" and not force:
        return None
    device = resolve_device(name)
    error = device_scope_error(scenario)
    if error is not None:
        raise ScenarioError(error)
    return device
