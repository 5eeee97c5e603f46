"""Mixing (gossip) matrices of a peer graph and how fast they mix.

Row ``i`` of a mixing matrix ``W`` holds the weights peer ``i`` gives to itself and its
neighbours when averaging models: ``x_i <- sum_j W_ij x_j``. Rows and columns follow the
sorted node labels, i.e. peer ``i`` is row ``i`` for the graphs of :func:`build_graph`.
Matrices are :class:`scipy.sparse.csr_matrix` so graphs of thousands of peers stay cheap.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import scipy.sparse.linalg as spla

from topologies.weights import metropolis_hastings_weight

__all__ = [
    "DENSE_EIG_LIMIT",
    "is_doubly_stochastic",
    "is_row_stochastic",
    "metropolis_hastings",
    "spectral_gap",
    "uniform",
]

DENSE_EIG_LIMIT = 2000
"""Up to this many peers :func:`spectral_gap` uses a dense eigensolver (exact, fast enough)."""

_ARPACK_MAXITER = 300
"""Restarts before the sparse solver gives up on plain iteration (ample for well-mixing graphs)."""


def metropolis_hastings(g: nx.Graph) -> sp.csr_matrix:
    """Metropolis-Hastings weights, the D-PSGD default.

    ``W_ij = 1 / (max(deg_i, deg_j) + 1)`` for every edge and ``W_ii = 1 - sum_j W_ij``.
    Each peer needs only its neighbours' degrees, and ``W`` is symmetric and doubly
    stochastic on any graph, so gossip averaging converges to the true mean.
    """
    n, deg, u, v = _edge_arrays(g)
    w = metropolis_hastings_weight(deg[u], deg[v])
    off = sp.coo_matrix(
        (np.concatenate([w, w]), (np.concatenate([u, v]), np.concatenate([v, u]))), shape=(n, n)
    )
    diag = 1.0 - np.asarray(off.sum(axis=1)).ravel()
    return (off + sp.diags(diag)).tocsr()


def uniform(g: nx.Graph) -> sp.csr_matrix:
    """Each peer averages itself and its neighbours equally: row ``i`` is ``1 / (deg_i + 1)``.

    Row-stochastic but, unlike Metropolis-Hastings, neither symmetric nor column-stochastic
    unless the graph is regular: peers of high degree pull the consensus towards their
    neighbourhoods, so the fixed point is a degree-weighted mean, not the plain mean.
    """
    n, deg, u, v = _edge_arrays(g)
    rows = np.concatenate([u, v, np.arange(n)])
    cols = np.concatenate([v, u, np.arange(n)])
    return sp.coo_matrix((1.0 / (deg[rows] + 1.0), (rows, cols)), shape=(n, n)).tocsr()


def spectral_gap(w: sp.spmatrix | np.ndarray, *, dense_limit: int = DENSE_EIG_LIMIT) -> float:
    """``1 - |lambda_2|``, one minus the second largest eigenvalue modulus of ``w``.

    The larger the gap, the faster repeated mixing reaches consensus (the error shrinks
    roughly by ``1 - gap`` per round); it is ``0`` for a disconnected graph and ``1`` for
    a complete graph under Metropolis-Hastings. A 1-peer matrix has gap 1.

    A non-symmetric ``w`` of a reversible chain (such as :func:`uniform`) is first made
    symmetric by a diagonal similarity, which keeps its eigenvalues and allows the fast
    symmetric solvers. Up to ``dense_limit`` peers all eigenvalues are computed (exact).
    Beyond, ARPACK finds the two of largest modulus from a fixed start vector, so the
    result is reproducible; for a slowly mixing graph (a long ring), where that stalls, it
    falls back to shift-invert next to 1, plus the smallest eigenvalue when it could matter.
    """
    n = w.shape[0]
    if n <= 1:
        return 1.0
    m = sp.csr_matrix(w, dtype=float)
    sym = m if _is_symmetric(m) else _symmetrized(m)
    if sym is not None and n <= dense_limit:
        slem = float(np.max(np.abs(scipy.linalg.eigvalsh(sym.toarray())[[0, -2]])))
    elif sym is not None:
        slem = _sparse_slem_symmetric(sym)
    elif n <= dense_limit:
        slem = float(np.sort(np.abs(scipy.linalg.eigvals(m.toarray())))[-2])
    else:
        eig = spla.eigs(m, k=2, which="LM", v0=_start_vector(n), return_eigenvectors=False)
        slem = float(np.sort(np.abs(eig))[0])
    return max(0.0, 1.0 - slem)


def is_row_stochastic(w: sp.spmatrix | np.ndarray, tol: float = 1e-9) -> bool:
    """Whether ``w`` has no negative entries and every row sums to 1 (within ``tol``)."""
    m = sp.csr_matrix(w, dtype=float)
    return _nonnegative(m, tol) and _sums_to_one(m, axis=1, tol=tol)


def is_doubly_stochastic(w: sp.spmatrix | np.ndarray, tol: float = 1e-9) -> bool:
    """Whether ``w`` has no negative entries and every row and column sums to 1.

    Double stochasticity is what makes gossip averaging preserve the mean of the models.
    """
    m = sp.csr_matrix(w, dtype=float)
    return (
        _nonnegative(m, tol)
        and _sums_to_one(m, axis=1, tol=tol)
        and _sums_to_one(m, axis=0, tol=tol)
    )


# --------------------------------------------------------------------------- helpers


def _edge_arrays(g: nx.Graph) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``n``, degrees and edge endpoints as row indices (sorted node order); no self-loops."""
    index = {node: i for i, node in enumerate(sorted(g.nodes))}
    n = len(index)
    edges = [(index[a], index[b]) for a, b in g.edges if a != b]
    pairs = np.array(edges, dtype=np.int64).reshape(-1, 2)
    u, v = pairs[:, 0], pairs[:, 1]
    deg = np.bincount(np.concatenate([u, v]), minlength=n).astype(float)
    return n, deg, u, v


def _start_vector(n: int) -> np.ndarray:
    """A fixed, generic ARPACK start vector (ARPACK's own is random, so results would vary).

    Not the all-ones vector: that is the top eigenvector of a doubly stochastic matrix
    and would hide every other eigenvalue.
    """
    return np.random.default_rng(0).random(n) + 0.5


def _sparse_slem_symmetric(w: sp.csr_matrix) -> float:
    n = w.shape[0]
    v0 = _start_vector(n)
    try:
        eig = spla.eigsh(
            w, k=2, which="LM", maxiter=_ARPACK_MAXITER, v0=v0, return_eigenvectors=False
        )
        return float(np.sort(np.abs(eig))[0])
    except spla.ArpackNoConvergence:
        pass
    # Eigenvalues near 1 are crowded: invert around a shift just above 1 to spread them.
    top = spla.eigsh(w.tocsc(), k=2, sigma=1.0 + 1e-9, which="LM", v0=v0, return_eigenvectors=False)
    second = float(np.min(top))
    # Gershgorin: no eigenvalue is below min_i (w_ii - sum_{j != i} |w_ij|).
    diag = w.diagonal()
    off_abs = np.asarray(abs(w).sum(axis=1)).ravel() - np.abs(diag)
    if -float(np.min(diag - off_abs)) <= second:
        return second
    lowest = spla.eigsh(w, k=1, which="SA", ncv=min(n, 32), v0=v0, return_eigenvectors=False)
    return max(second, -float(lowest[0]))


def _symmetrized(w: sp.csr_matrix) -> sp.csr_matrix | None:
    """``D^1/2 W D^-1/2`` when it is symmetric for some positive diagonal ``D``, else ``None``.

    That ``D`` exists exactly when ``W`` is a reversible chain (detailed balance
    ``pi_i W_ij = pi_j W_ji``; then ``D = diag(pi)``); the result has ``W``'s eigenvalues.
    ``pi`` is propagated along a BFS tree of each component, then checked on every link.
    """
    if w.nnz and float(w.data.min()) < 0:
        return None
    w = w.copy()
    w.eliminate_zeros()
    pattern = (w != 0).astype(np.int8)
    if (pattern != pattern.T).nnz:
        return None
    n = w.shape[0]
    log_pi = np.full(n, np.nan)
    for root in range(n):
        if not np.isnan(log_pi[root]):
            continue
        order, pred = csgraph.breadth_first_order(w, root, directed=False)
        log_pi[root] = 0.0
        children = order[1:]
        if children.size == 0:
            continue
        parents = pred[children]
        step = np.log(np.asarray(w[parents, children]).ravel()) - np.log(
            np.asarray(w[children, parents]).ravel()
        )
        for child, parent, delta in zip(children, parents, step, strict=True):
            log_pi[child] = log_pi[parent] + delta
    half = sp.diags(np.exp(0.5 * (log_pi - log_pi.max())))
    inv_half = sp.diags(np.exp(-0.5 * (log_pi - log_pi.max())))
    sym = (half @ w @ inv_half).tocsr()
    return sym if _is_symmetric(sym, tol=1e-9 * max(float(abs(sym).max()), 1.0)) else None


def _is_symmetric(w: sp.spmatrix | np.ndarray, tol: float = 1e-12) -> bool:
    m = sp.csr_matrix(w, dtype=float)
    diff = m - m.T
    return diff.nnz == 0 or float(np.abs(diff.data).max()) <= tol


def _nonnegative(m: sp.csr_matrix, tol: float) -> bool:
    return m.nnz == 0 or float(m.data.min()) >= -tol


def _sums_to_one(m: sp.csr_matrix, *, axis: int, tol: float) -> bool:
    sums = np.asarray(m.sum(axis=axis)).ravel()
    return bool(np.all(np.abs(sums - 1.0) <= tol))
