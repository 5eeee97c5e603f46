"""Local training: plain SGD steps on flat parameter vectors, one peer or many at once.

A peer's whole learning state is its parameter vector (SGD keeps no optimizer state) and
its sampler's position. ``LocalTrainer`` runs ``steps`` minibatch SGD steps from a vector
and returns a new one, along two paths that compute the same thing:

- ``train``: the per-peer reference. One ``nn.Module``, ordinary autograd, one step after
  another. What a real node runs, and the baseline the batched path is checked against.
- ``train_batched``: many peers as one computation. The model is called functionally
  (``torch.func.functional_call``) on a stack of parameter vectors, with per-peer
  gradients from ``vmap(grad(loss))``. Per-peer Python work is limited to drawing batch
  indices; the data gather is one ``index_select`` over one concatenated index array.

The update is ``p <- p - lr * (g + weight_decay * p)`` with ``g`` the gradient of the mean
cross-entropy over the batch; the loss reported is the mean of the steps' batch losses,
each taken before its update.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from p2pfl.learning.sampler import BatchSampler
from p2pfl.model import ParamLayout, flatten_module, load_flat, unflatten

__all__ = ["BatchSampler", "BatchTransform", "LocalTrainer", "activation_numel"]

# Changes a batch before training on it: (x, y) -> (x, y), same shapes. Attacks use it
# (label flipping, backdoor triggers); it must not modify its inputs in place.
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Bound on the activations of one batched call, in float32 elements (16 MiB): sets how
# many peers ``train_batched`` and ``evaluate`` process together. Small blocks stay in
# cache and reuse freed memory instead of faulting in fresh pages: on a 2-core EPYC, MNIST
# MLP steps ran fastest with 64-256 peers per call and 1.3-2.5x slower with 1,000.
ACTIVATION_BUDGET = 1 << 22


def activation_numel(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Elements of all leaf modules' outputs for one sample: a proxy for memory per sample."""
    total = 0

    def count(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return max(total, 1)


class LocalTrainer:
    """SGD on flat parameter vectors over one shared dataset ``(x, y)``.

    ``x`` and ``y`` are the whole training set; peers differ only by the samplers (index
    arrays) they pass in. The given ``model`` fixes the architecture and is never modified;
    the trainer works on private copies, so it is not thread-safe: one caller at a time.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        lr: float,
        batch_size: int,
        weight_decay: float = 0.0,
        stacked: bool = True,
    ) -> None:
        if any(True for _ in model.buffers()):
            raise ValueError(
                "the model has buffers (e.g. BatchNorm): it must be a pure function of its parameters"
            )
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.x = x
        self.y = y
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.weight_decay = float(weight_decay)
        self.input_shape = tuple(x.shape[1:])
        # Two private copies: one called functionally (batched path, evaluation), one
        # trained in place (reference path). A trainer serves one thread at a time.
        self._net = copy.deepcopy(model).requires_grad_(True)
        self._ref = copy.deepcopy(model).requires_grad_(True)
        self._ref_params = list(self._ref.parameters())  # a walk of the modules per call costs
        self._layout = ParamLayout.from_module(self._net)
        self._activation = activation_numel(self._net, self.input_shape)
        self._peer_grad = vmap(grad_and_value(self._batch_loss))
        self._peer_logits = vmap(self._logits, in_dims=(0, None))
        # Flatten/Linear/ReLU stacks (the MLP, logistic regression) skip vmap: see _StackedMLP.
        self._stacked = _StackedMLP.from_module(self._net) if stacked else None

    @property
    def layout(self) -> ParamLayout:
        """Where each named parameter lives in the flat vector."""
        return self._layout

    @property
    def stacked_kernel(self) -> _StackedMLP | None:
        """The batched SGD step of a Flatten/Linear/ReLU model (``None`` for any other
        model, which trains through ``vmap``): what a device path can run as it is."""
        return self._stacked

    @property
    def dim(self) -> int:
        """Length of a parameter vector."""
        return self._layout.numel

    @property
    def num_outputs(self) -> int:
        """Number of classes the model predicts (rows of the output layer's weight)."""
        layout = self._layout
        return layout.shapes[layout.index(layout.output_layer_names()[0])][0]

    def logits_batched(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, N, classes)`` of each model in ``params`` (B, d) on shared ``x`` (N, ...)."""
        views = unflatten(params, self._layout)
        if self._stacked is not None:
            return self._stacked.logits(views, x)
        return self._peer_logits(views, x)

    def peers_per_call(self, samples_per_peer: int) -> int:
        """How many peers one batched call handles, keeping activations in budget."""
        return max(1, ACTIVATION_BUDGET // (self._activation * max(samples_per_peer, 1)))

    def on_device(self, device: torch.device) -> LocalTrainer:
        """This trainer with its training data on ``device``: a copy sharing the model and
        the kernels, whose batched path gathers batches there, so that only the batch
        indices travel (the simulator's ``sim.device``)."""
        moved = copy.copy(self)
        moved.x, moved.y = self.x.to(device), self.y.to(device)
        return moved

    def init_params(self, seed: int) -> torch.Tensor:
        """A freshly initialised parameter vector, the same for the same seed.

        Uses each layer's own ``reset_parameters`` under a private generator state, so it
        neither reads nor disturbs torch's global random state.
        """
        net = copy.deepcopy(self._net)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in net.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        return flatten_module(net)

    # ------------------------------------------------------------------ per-peer path
    def train(
        self,
        params: torch.Tensor,
        sampler: BatchSampler,
        steps: int,
        *,
        transform: BatchTransform | None = None,
    ) -> tuple[torch.Tensor, float]:
        """``steps`` SGD steps from ``params`` (d,) on ``sampler``'s batches.

        Returns the new vector (``params`` is left untouched) and the mean batch loss
        (NaN for zero steps).
        """
        self._check_vector(params)
        if steps <= 0:
            return params.detach().clone(), float("nan")
        net, weights = self._ref, self._ref_params
        load_flat(net, params.detach())
        total = 0.0
        for _ in range(steps):
            x, y = self._gather(sampler.next_batch().copy())  # the sampler's view is read-only
            if transform is not None:
                x, y = transform(x, y)
            for p in weights:  # as ``zero_grad(set_to_none=True)``, without its module walk
                p.grad = None
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            with torch.no_grad():
                for p in weights:
                    if p.grad is not None:  # a parameter the loss does not reach stays
                        self._sgd_update(p, p.grad)
            total += loss.item()
        return flatten_module(net), total / steps

    def train_one(
        self,
        params: torch.Tensor,
        sampler: BatchSampler,
        steps: int,
        *,
        transform: BatchTransform | None = None,
    ) -> tuple[torch.Tensor, float]:
        """What ``train`` returns, by the simulator's arithmetic: a real node's training.

        Where the model has the stacked kernel (a Flatten/Linear/ReLU stack), one peer is
        trained as a batch of one through it -- the very operations its simulated twin
        goes through, and 0.6x the CPU of ``train``'s module and autograd calls on the
        digits MLP (``benchmarks/node_footprint.py``); any other model takes ``train``.
        Same batches, same sampler advance, same result within float rounding.
        """
        if self._stacked is None:
            return self.train(params, sampler, steps, transform=transform)
        self._check_vector(params)
        out, losses = self.train_batched(
            params.detach().unsqueeze(0), [sampler], steps,
            transforms=None if transform is None else [transform],
        )
        return out[0], float(losses[0])

    # ------------------------------------------------------------------- batched path
    def train_batched(
        self,
        params: torch.Tensor,
        samplers: Sequence[BatchSampler],
        steps: int,
        *,
        transforms: Sequence[BatchTransform | None] | None = None,
        chunk: int | None = None,
        inplace: bool = False,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` SGD steps for each row of ``params`` (B, d), row ``i`` on ``samplers[i]``.

        Returns the new ``(B, d)`` stack and each peer's mean batch loss ``(B,)``. Gives the
        same result as ``train`` row by row, within float tolerance, and advances each
        sampler exactly as ``train`` would. ``transforms[i]`` (optional) changes peer
        ``i``'s batches. Peers are processed ``chunk`` at a time (default: as many as the
        activation budget allows), all steps of a chunk together.

        Where the result goes: by default a new tensor (``params`` is left untouched);
        ``out`` (a float32 ``(B, d)`` tensor whose rows are contiguous) receives it instead,
        the first step reading ``params`` and writing ``out`` so that no separate copy is
        made; ``inplace=True`` updates ``params`` itself when it is a contiguous float32
        tensor. At 10,000 peers, an extra ``(B, d)`` copy costs about as much as a step.
        """
        if params.dim() != 2 or params.shape[1] != self.dim:
            raise ValueError(f"expected params of shape (B, {self.dim}), got {tuple(params.shape)}")
        num = params.shape[0]
        if len(samplers) != num:
            raise ValueError(f"{num} parameter rows but {len(samplers)} samplers")
        if transforms is not None and len(transforms) != num:
            raise ValueError(f"{num} parameter rows but {len(transforms)} transforms")
        params = params.detach()
        if out is not None:
            if out.shape != params.shape or out.dtype != torch.float32 or out.stride(-1) != 1:
                raise ValueError(
                    f"out must be a float32 tensor of shape {tuple(params.shape)} with contiguous rows"
                )
        elif inplace and params.dtype == torch.float32 and params.stride(-1) == 1:
            out = params
        if steps <= 0:
            if out is None:
                return params.to(torch.float32, copy=True), torch.full((num,), float("nan"))
            if out is not params:
                out.copy_(params)
            return out, torch.full((num,), float("nan"))
        if params.dtype != torch.float32 or params.stride(-1) != 1:
            params = params.to(torch.float32).contiguous()
        if out is None:
            out = torch.empty_like(params, memory_format=torch.contiguous_format)
        if any(s.batch_size != self.batch_size for s in samplers):
            raise ValueError(f"every sampler must draw batches of {self.batch_size}")
        losses = torch.zeros(num, dtype=torch.float32, device=params.device)
        chunk = chunk or self.peers_per_call(self.batch_size)
        for start in range(0, num, chunk):
            stop = min(start + chunk, num)
            source = unflatten(params[start:stop], self._layout)
            target = source if out is params else unflatten(out[start:stop], self._layout)
            group = samplers[start:stop]
            group_transforms = transforms[start:stop] if transforms is not None else None
            for _ in range(steps):
                x, y = self._gather_many(group)
                if group_transforms is not None:
                    _apply_transforms(x, y, group_transforms)
                if self._stacked is not None:
                    loss = self._stacked.step(
                        source, target, x, y, lr=self.lr, weight_decay=self.weight_decay
                    )
                else:
                    grads, loss = self._peer_grad(source, x, y)
                    with torch.no_grad():
                        for name, view in source.items():
                            self._sgd_update(view, grads[name], out=target[name])
                losses[start:stop] += loss
                source = target  # later steps continue from the result, in place
        return out, losses / steps

    # ---------------------------------------------------------------------- internals
    def _sgd_update(
        self, param: torch.Tensor, grad: torch.Tensor, *, out: torch.Tensor | None = None
    ) -> None:
        """``out = param - lr * (grad + weight_decay * param)``, in place when ``out`` is
        ``param`` or absent; the same operations on both paths."""
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        if out is None or out is param:
            param.sub_(grad, alpha=self.lr)
        else:
            torch.sub(param, grad, alpha=self.lr, out=out)

    def _logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._net, params, (x,))

    def _batch_loss(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        return F.cross_entropy(self._logits(params, x), y)

    def _gather(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(self.x.device)
        return self.x.index_select(0, t), self.y.index_select(0, t)

    def _gather_many(self, samplers: Sequence[BatchSampler]) -> tuple[torch.Tensor, torch.Tensor]:
        """One stacked batch per sampler: ``x`` (k, batch, *input), ``y`` (k, batch)."""
        idx = np.concatenate([s.next_batch() for s in samplers])
        x, y = self._gather(idx)
        k = len(samplers)
        return x.view(k, self.batch_size, *self.input_shape), y.view(k, self.batch_size)

    def _check_vector(self, params: torch.Tensor) -> None:
        if params.dim() != 1 or params.numel() != self.dim:
            raise ValueError(
                f"expected a parameter vector of {self.dim} values, got {tuple(params.shape)}"
            )


class _StackedMLP:
    """Loss and gradients of a Flatten/Linear/ReLU stack for many peers at once, by bmm.

    Why not ``vmap(grad(...))``: for models this small, functorch's per-call machinery
    costs more than the arithmetic (about 6 ms per call against 20 ms of compute for 150
    MNIST-MLP peers, measured on a 2-core EPYC), and the simulator often trains a few
    dozen peers at a time. Here each layer is one ``baddbmm`` forward and two ``bmm``
    backward, with the formulas autograd applies (log-softmax cross-entropy, ReLU masked
    by its output), so the gradients agree with the per-peer path within float rounding.
    """

    def __init__(self, layers: list[tuple[str, str | None, bool]]) -> None:
        #: (weight name, bias name or None, ReLU after it) per Linear, input to output
        self.layers = layers

    @classmethod
    def from_module(cls, module: nn.Module) -> _StackedMLP | None:
        """The plan for ``module``, or ``None`` if it is not a plain Linear/ReLU stack."""
        if type(module) is not nn.Sequential:
            return None
        layers: list[tuple[str, str | None, bool]] = []
        children = list(module.named_children())
        for position, (name, child) in enumerate(children):
            if type(child) is nn.Flatten and position == 0 and child.start_dim == 1 and child.end_dim == -1:
                continue
            if type(child) is nn.Linear:
                bias = f"{name}.bias" if child.bias is not None else None
                layers.append((f"{name}.weight", bias, False))
            elif type(child) is nn.ReLU and layers and not layers[-1][2]:
                weight, last_bias, _ = layers[-1]
                layers[-1] = (weight, last_bias, True)
            else:
                return None
        if not layers or layers[-1][2]:
            return None  # must end with the output Linear
        return cls(layers)

    def step(
        self,
        source: dict[str, torch.Tensor],
        target: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        lr: float,
        weight_decay: float,
    ) -> torch.Tensor:
        """One SGD step for every peer: ``target = source - lr * (grad + wd * source)``.

        ``source[name]`` and ``target[name]`` have a leading peer dimension ``k`` (they
        may be the same tensors); ``x`` is ``(k, batch, ...)`` and ``y`` ``(k, batch)``.
        Each weight update is fused into the product that computes its gradient
        (``baddbmm``), which saves writing and reading a gradient as large as the
        weights. Returns each peer's loss before the step, ``(k,)``.
        """
        k, batch = y.shape
        inputs = [x.reshape(k, batch, -1)]
        h = inputs[0]
        with torch.no_grad():
            for position, (weight, bias, relu) in enumerate(self.layers):
                w = source[weight].transpose(1, 2)
                h = torch.baddbmm(source[bias].unsqueeze(1), h, w) if bias else torch.bmm(h, w)
                if relu:
                    h.clamp_(min=0)
                if position < len(self.layers) - 1:
                    inputs.append(h)
            log_p = torch.log_softmax(h, dim=-1)
            picked = log_p.gather(-1, y.unsqueeze(-1))
            loss = -picked.squeeze(-1).mean(dim=1)
            grad = log_p.exp_()  # softmax: log_p is not needed any more
            grad.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(picked, -1.0)).div_(batch)
            for position in range(len(self.layers) - 1, -1, -1):
                weight, bias, _ = self.layers[position]
                below = inputs[position]
                old = source[weight]
                down = torch.bmm(grad, old) if position else None  # before ``old`` changes
                # p - lr * (g + wd * p) == (1 - lr * wd) * p - lr * g
                torch.baddbmm(old, grad.transpose(1, 2), below, beta=1.0 - lr * weight_decay,
                              alpha=-lr, out=target[weight])
                if bias:
                    step = grad.sum(dim=1)
                    if weight_decay:
                        step = step + weight_decay * source[bias]
                    torch.sub(source[bias], step, alpha=lr, out=target[bias])
                if down is not None:
                    grad = down
                    if self.layers[position - 1][2]:
                        grad.mul_(below > 0)  # ReLU: ``below`` is its output
        return loss

    def logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits ``(k, N, classes)`` of ``k`` peers' models (``params[name]`` has a leading
        peer dimension) on shared inputs ``x`` ``(N, ...)``: the forward pass of ``step``,
        without functorch's per-call machinery (evaluation calls it every round)."""
        h = x.reshape(1, len(x), -1)  # broadcast over the peers
        for weight, bias, relu in self.layers:
            h = torch.matmul(h, params[weight].transpose(1, 2))
            if bias:
                h = h.add_(params[bias].unsqueeze(1))
            if relu:
                h.clamp_(min=0)
        return h


def _apply_transforms(
    x: torch.Tensor, y: torch.Tensor, transforms: Sequence[BatchTransform | None]
) -> None:
    """Replace row ``i`` of the stacked batch by ``transforms[i]`` of it, where given."""
    for i, transform in enumerate(transforms):
        if transform is not None:
            xi, yi = transform(x[i], y[i])
            if xi.shape != x[i].shape or yi.shape != y[i].shape:
                raise ValueError("a batch transform must keep the batch's shapes")
            x[i] = xi
            y[i] = yi
