"""Memory-bank subsampling: approximate greedy k-center coreset (PatchCore eq. 5), random, or none.

The greedy coreset follows the official `ApproximateGreedyCoresetSampler`: JL-project the features to
`projection_dim`, start from the mean distance to `num_starts` random points, then k times pick the point
farthest from the chosen set (c = argmax d, first index on ties) and update d = min(d, ‖z − z_c‖).

Exactness. The projected features are snapped to a fixed-point grid (`to_exact_grid`: 2^-B steps after
a power-of-two normalisation, B ≈ 21 bits for 128 dims) and every distance is accumulated in float64.
On that grid every product and every partial sum is an exactly representable float64, so
‖z_i‖² − 2 z_i·z_c + ‖z_c‖² and Σ (z_ij − z_cj)² give the *same bits* in any summation order (BLAS GEMV,
numba SIMD, CUDA); only the final sqrt rounds, and IEEE sqrt is correctly rounded everywhere. Hence the
pruned CPU kernel, the GPU full scan and `reference_greedy_coreset` pick identical indices, ties included.

Speed (CPU, numba): the Gonzalez "cluster list" scheme with triangle-inequality pruning. Points are kept in
groups by the centre ("anchor") that last lowered their d, with r_i = ‖z_i − anchor‖. A new centre c can
lower d_i only if ‖c − anchor‖ < d_i + r_i, so a group is skipped when ‖c − anchor‖ ≥ max(d + r) over the
group (first tested on 16 leading dims, then exactly), and inside a visited group points failing the bound
are skipped without reading their vector. Group rows are stored contiguously and moved on reassignment.
Memory is O(N): the grid, a 1.5·N-row pool and O(N + k) bookkeeping; never an N×N or N×k matrix.
The kernel is single-threaded on purpose: a step takes ~0.25 ms, less than waking a second thread on a
loaded 2-core machine. How much the pruning skips depends on the data: clustered, low-intrinsic-dimension
features (CNN patches) skip ~98 % of the points per step; isotropic Gaussian noise skips almost nothing and
costs about one full scan per step (bench/results/coreset.md has both).
GPU: an exact float64 full scan per step, with blocks of steps captured in a CUDA graph (no per-step
launch overhead and no host synchronisation).
"""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from patchcore_core.errors import DataError

log = logging.getLogger(__name__)

try:  # numba is a runtime dependency; without it the CPU path falls back to the exact torch full scan
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None
    HAVE_NUMBA = False

_EPS = 1e-9  # relative safety margin of every pruning test; covers the few-ulp rounding of sqrt and sums
_LEAD = 16  # leading dims of the cheap first-stage group test
_STEPS_PER_CALL = 512  # kernel steps between progress-bar updates
_GRAPH_STEPS = 128  # greedy steps captured in one CUDA graph


# --------------------------------------------------------------------------------------------- projection
def jl_projection(features: np.ndarray | torch.Tensor, projection_dim: int, seed: int,
                  dtype: str = "float32") -> np.ndarray | torch.Tensor:
    """Johnson–Lindenstrauss projection to `projection_dim` with a seeded N(0, 1/projection_dim) matrix.

    Features of at most `projection_dim` dims are returned unchanged (cast to `dtype`). A CUDA tensor is
    projected on its device and returned as a tensor; anything else comes back as a numpy array.
    """
    on_gpu = isinstance(features, torch.Tensor) and features.device.type != "cpu"
    tdtype = _torch_dtype(dtype)
    x = features.to(tdtype) if on_gpu else torch.as_tensor(np.asarray(features), dtype=tdtype)
    if x.shape[1] > projection_dim:
        gen = torch.Generator().manual_seed(seed)
        matrix = torch.randn(x.shape[1], projection_dim, generator=gen) / np.sqrt(projection_dim)
        x = x @ matrix.to(device=x.device, dtype=tdtype)
    return x if on_gpu else x.numpy()


def grid_bits(dim: int) -> int:
    """Fixed-point bits per coordinate such that every squared distance of `dim`-dim grid points is exact.

    Coordinates are integers below 2^B (times 2^-B); |Σ terms| ≤ 4·dim·2^(2B) must stay below 2^52.
    """
    return int(min(22, (50 - math.ceil(math.log2(max(dim, 1)))) // 2))


def to_exact_grid(z: np.ndarray | torch.Tensor, chunk: int = 65536) -> tuple[np.ndarray | torch.Tensor, float]:
    """Snap `z` to the exact grid: returns (float32 values q·2^-B with |q| < 2^B, scale) with z ≈ values·scale.

    The scale is a power of two, so distances in original units are grid distances times `scale`. Every
    operation (power-of-two scaling, rounding) is exact, so the result does not depend on the input's
    float type or device. Idempotent: snapping grid values again returns them unchanged.
    """
    t = z if isinstance(z, torch.Tensor) else torch.from_numpy(np.asarray(z))
    if t.ndim != 2:
        raise DataError(f"coreset features must be a 2-D [N, D] array, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    maxabs = max(float(t.max()), -float(t.min())) if t.numel() else 0.0
    if not math.isfinite(maxabs):  # torch.max propagates NaN
        raise DataError("coreset features contain NaN or inf")
    bits = grid_bits(t.shape[1])
    exponent = math.frexp(maxabs)[1] if maxabs > 0 else 0  # maxabs < 2**exponent
    up, down, limit = 2.0 ** (bits - exponent), 2.0**-bits, float(2**bits - 1)
    grid = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    for lo in range(0, t.shape[0], chunk):
        # float64: 2^(B - exponent) cannot overflow; |q| < 2^24 is exact in float32 afterwards
        q = torch.round(t[lo : lo + chunk].to(torch.float64) * up).clamp_(-limit, limit)
        grid[lo : lo + chunk] = q * down
    return (grid if isinstance(z, torch.Tensor) else grid.numpy()), 2.0**exponent


# ------------------------------------------------------------------------------------- shared start state
def _start_indices(n: int, num_starts: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(n, size=min(num_starts, n), replace=False).astype(np.int64)


def _initial_state(grid: torch.Tensor, starts: np.ndarray, chunk: int = 65536
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d0 = mean distance to the start points (summed in start order), r0/a0 = nearest start distance/slot.

    Computed with exact float64 squared distances, so every backend gets the same bits.
    """
    zs = grid[torch.as_tensor(starts, device=grid.device)].to(torch.float64)
    sqs = (zs * zs).sum(1)
    d0, r0, a0 = [], [], []
    for lo in range(0, grid.shape[0], chunk):
        b = grid[lo : lo + chunk].to(torch.float64)
        dist = torch.sqrt(torch.clamp((b * b).sum(1, keepdim=True) - 2.0 * (b @ zs.T) + sqs, min=0.0))
        acc = dist[:, 0].clone()
        for s in range(1, dist.shape[1]):
            acc += dist[:, s]
        d0.append(acc / dist.shape[1])
        r, a = torch.min(dist, dim=1)  # first index on ties (documented for torch.min with dim)
        r0.append(r)
        a0.append(a)
    return torch.cat(d0), torch.cat(r0), torch.cat(a0)


# -------------------------------------------------------------------------------------------- reference
def reference_greedy_coreset(z: np.ndarray, k: int, num_starts: int = 10, seed: int = 0,
                             progress: bool = False) -> np.ndarray:
    """Plain GEMV-form greedy loop on already-projected `z` (snapped to the exact grid first).

    Per step: c = argmax d (first index on ties); d = min(d, sqrt(max(‖z‖² − 2 z·z_c + ‖z_c‖², 0))),
    all in float64 over the grid, so the result is the exact selection every other backend must match.
    """
    grid, _ = to_exact_grid(np.asarray(z))
    z64 = grid.astype(np.float64)
    sq = np.einsum("ij,ij->i", z64, z64)
    starts = _start_indices(len(z64), num_starts, seed)
    d = _initial_state(torch.from_numpy(grid), starts)[0].numpy()
    chosen = np.empty(k, dtype=np.int64)
    for step in tqdm(range(k), desc="coreset (reference)", disable=not progress, leave=False, mininterval=1.0):
        c = int(np.argmax(d))
        chosen[step] = c
        dc = sq - 2.0 * (z64 @ z64[c]) + sq[c]
        np.maximum(dc, 0.0, out=dc)
        np.sqrt(dc, out=dc)
        np.minimum(d, dc, out=d)
    return chosen


# ---------------------------------------------------------------------------------- numba pruned kernel
if HAVE_NUMBA:
    _FM = {"reassoc", "contract"}  # reordering is harmless: grid sums are exact; sqrt stays IEEE

    @numba.njit(fastmath=_FM, cache=True)
    def _sqdist(rows, p, zc):  # exact squared distance of rows[p] to zc
        acc = 0.0
        for j in range(zc.shape[0]):
            df = np.float64(rows[p, j]) - zc[j]
            acc += df * df
        return acc

    @numba.njit(fastmath=_FM, cache=True)
    def _lead_sqdist(lead, q, zlead):  # float32 squared distance on the leading dims (a lower bound)
        acc = np.float32(0.0)
        for j in range(zlead.shape[0]):
            df = lead[q, j] - zlead[j]
            acc += df * df
        return acc

    @numba.njit(cache=True)
    def _copy_row(dst, di, src, si):  # explicit loop: compiles much faster than row slicing
        for j in range(src.shape[1]):
            dst[di, j] = src[si, j]

    @numba.njit(fastmath=_FM, cache=True)
    def _near_slots(lead, maxsum, zlead, nslots, near, cand):
        """Slots whose anchor may lie within max(d + r) of the new centre, by the leading-dims lower bound.

        The float32 partial sum errs by < 1e-6 relative; the 1e-4 margin keeps the test conservative.
        """
        for q in range(nslots):
            near[q] = 0.0
        for j in range(lead.shape[0]):
            zj = zlead[j]
            for q in range(nslots):
                df = lead[j, q] - zj
                near[q] += df * df
        ncand = 0
        for q in range(nslots):
            thr = maxsum[q] * (1.0 + _EPS)
            if near[q] < np.float32(thr * thr * 1.0001):
                cand[ncand] = q
                ncand += 1
        return ncand

    @numba.njit(cache=True)
    def _argmax_slots(maxd, arg, nslots, n):
        """(max d, smallest point index attaining it) over the slots: the global argmax with first-index ties."""
        best = -1.0
        for q in range(nslots):
            best = max(best, maxd[q])
        best_i = n
        for q in range(nslots):
            if maxd[q] == best:
                best_i = min(best_i, arg[q])
        return best, best_i

    @numba.njit(cache=True)
    def _pruned_init(z, d0, r0, a0, starts, k):
        """Group the points by nearest start point and allocate the kernel state (a tuple of arrays)."""
        n, dim = z.shape
        n_starts = starts.shape[0]
        n_groups = n_starts + k
        nlead = min(dim, _LEAD)
        cap = n + n // 2 + 1024
        pidx = np.empty(cap, np.int64)  # pool: point index, d, r, vector; one contiguous segment per group
        pd = np.empty(cap)
        pr = np.empty(cap)
        pz = np.empty((cap, dim), np.float32)
        gstart = np.zeros(n_groups, np.int64)
        glen = np.zeros(n_groups, np.int64)
        anchor = np.empty((n_groups, dim), np.float32)
        s_grp = np.empty(n_groups, np.int64)  # slot arrays: one entry per live group, scanned every step
        s_lead = np.zeros((nlead, n_groups), np.float32)  # by dim, so the slot scan vectorises over slots
        s_maxsum = np.zeros(n_groups)  # max (d + r) over the group
        s_maxd = np.empty(n_groups)  # max d; -1 marks a dead slot
        s_arg = np.empty(n_groups, np.int64)  # smallest point index attaining max d
        for g in range(n_groups):
            s_maxd[g] = -1.0
            s_arg[g] = n
        outd = np.zeros(n)
        counts = np.zeros(n_starts, np.int64)
        for i in range(n):
            counts[a0[i]] += 1
        pos = 0
        for g in range(n_starts):
            gstart[g] = pos
            glen[g] = counts[g]
            pos += counts[g]
            _copy_row(anchor, g, z, starts[g])
            s_grp[g] = g
            for j in range(nlead):
                s_lead[j, g] = z[starts[g], j]
        fill = np.empty(n_starts, np.int64)
        for g in range(n_starts):
            fill[g] = gstart[g]
        for i in range(n):
            g = a0[i]
            p = fill[g]
            fill[g] += 1
            pidx[p] = i
            pd[p] = d0[i]
            pr[p] = r0[i]
            _copy_row(pz, p, z, i)
            s_maxsum[g] = max(s_maxsum[g], d0[i] + r0[i])
            if d0[i] > s_maxd[g]:
                s_maxd[g] = d0[i]
                s_arg[g] = i
        ndead = 0
        best = -1.0
        best_i = n
        for q in range(n_starts):
            if s_maxd[q] < 0.0:
                ndead += 1
            elif s_maxd[q] > best or (s_maxd[q] == best and s_arg[q] < best_i):
                best = s_maxd[q]
                best_i = s_arg[q]
        ints = np.empty(5, np.int64)  # n_slots, n_dead, pool end, argmax, starts
        ints[0] = n_starts
        ints[1] = ndead
        ints[2] = n
        ints[3] = best_i
        ints[4] = n_starts
        flts = np.empty(1)
        flts[0] = best
        moved_i = np.empty(n, np.int64)
        moved_d = np.empty(n)
        return (pidx, pd, pr, pz, gstart, glen, anchor, s_grp, s_lead, s_maxsum, s_maxd, s_arg, outd,
                moved_i, moved_d, ints, flts)

    @numba.njit(cache=True)
    def _compact_pool(pidx, pd, pr, pz, gstart, glen, s_grp, s_maxd, nslots, pend):
        """Slide the live group segments to the front of the pool, in pool order (so never overlapping)."""
        owner = np.empty(pend + 1, np.int64)  # group whose segment starts at a pool position, else -1
        for p in range(pend + 1):
            owner[p] = -1
        for q in range(nslots):
            if s_maxd[q] >= 0.0 and glen[s_grp[q]] > 0:
                owner[gstart[s_grp[q]]] = s_grp[q]
        pos = 0
        for p in range(pend):
            g = owner[p]
            if g < 0:
                continue
            if p != pos:
                for m in range(glen[g]):
                    pidx[pos + m] = pidx[p + m]
                    pd[pos + m] = pd[p + m]
                    pr[pos + m] = pr[p + m]
                    _copy_row(pz, pos + m, pz, p + m)
            gstart[g] = pos
            pos += glen[g]
        return pos

    @numba.njit(cache=True)
    def _drop_dead_slots(s_grp, s_lead, s_maxsum, s_maxd, s_arg, nslots):
        w = 0
        for q in range(nslots):
            if s_maxd[q] >= 0.0:
                if w != q:
                    s_grp[w] = s_grp[q]
                    for j in range(s_lead.shape[0]):
                        s_lead[j, w] = s_lead[j, q]
                    s_maxsum[w] = s_maxsum[q]
                    s_maxd[w] = s_maxd[q]
                    s_arg[w] = s_arg[q]
                w += 1
        return w

    @numba.njit(cache=True)
    def _pruned_steps(z, state, chosen, t_begin, t_end):
        """Run greedy steps t_begin..t_end-1, writing the chosen indices; the state carries over."""
        (pidx, pd, pr, pz, gstart, glen, anchor, s_grp, s_lead, s_maxsum, s_maxd, s_arg, outd,
         moved_i, moved_d, ints, flts) = state
        n, dim = z.shape
        nlead = s_lead.shape[0]
        near = np.empty(s_lead.shape[1], np.float32)
        cand = np.empty(s_lead.shape[1], np.int64)
        cap = pidx.shape[0]
        nslots, ndead, pend, best_i, n_starts = ints[0], ints[1], ints[2], ints[3], ints[4]
        best = flts[0]
        zc = np.empty(dim)
        zlead = np.empty(nlead, np.float32)
        margin = 1.0 + _EPS
        for t in range(t_begin, t_end):
            if best <= 0.0:  # every d is 0: argmax is index 0 and nothing changes any more
                chosen[t] = 0
                continue
            c = best_i
            chosen[t] = c
            for j in range(dim):
                zc[j] = z[c, j]
            for j in range(nlead):
                zlead[j] = z[c, j]
            new_g = n_starts + t
            _copy_row(anchor, new_g, z, c)
            nmoved = 0
            new_max = 0.0
            new_arg = n
            ncand = _near_slots(s_lead, s_maxsum, zlead, nslots, near, cand)
            for u in range(ncand):
                q = cand[u]
                thr = s_maxsum[q] * margin
                thr2 = thr * thr
                g = s_grp[q]
                dcg2 = _sqdist(anchor, g, zc)
                if dcg2 >= thr2:
                    continue
                # visit: only in this group can a point get closer to c than to its anchor
                dcg = math.sqrt(dcg2)
                st = gstart[g]
                end = st + glen[g]
                msum = 0.0
                mmax = -1.0
                marg = n
                p = st
                while p < end:
                    i = pidx[p]
                    di = pd[p]
                    ri = pr[p]
                    if dcg < (di + ri) * margin:
                        dl = math.sqrt(_sqdist(pz, p, zc))
                        if dl < di:  # moves to the new group; the last row fills its place
                            moved_i[nmoved] = i
                            moved_d[nmoved] = dl
                            nmoved += 1
                            if dl > new_max or (dl == new_max and i < new_arg):
                                new_max = dl
                                new_arg = i
                            end -= 1
                            if end != p:
                                pidx[p] = pidx[end]
                                pd[p] = pd[end]
                                pr[p] = pr[end]
                                _copy_row(pz, p, pz, end)
                            continue
                    msum = max(msum, di + ri)
                    if di > mmax or (di == mmax and i < marg):
                        mmax = di
                        marg = i
                    p += 1
                glen[g] = end - st
                s_maxsum[q] = msum
                s_maxd[q] = mmax
                s_arg[q] = marg
                if mmax <= 0.0:  # all remaining d are 0: the group can never change again
                    for p2 in range(st, end):
                        outd[pidx[p2]] = pd[p2]
                    glen[g] = 0
                    s_maxd[q] = -1.0
                    s_maxsum[q] = 0.0
                    ndead += 1
            if pend + nmoved > cap:
                pend = _compact_pool(pidx, pd, pr, pz, gstart, glen, s_grp, s_maxd, nslots, pend)
            gstart[new_g] = pend
            glen[new_g] = nmoved
            for m in range(nmoved):
                pidx[pend + m] = moved_i[m]
                pd[pend + m] = moved_d[m]
                pr[pend + m] = moved_d[m]
                _copy_row(pz, pend + m, z, moved_i[m])
            pend += nmoved
            if ndead * 4 > nslots:
                nslots = _drop_dead_slots(s_grp, s_lead, s_maxsum, s_maxd, s_arg, nslots)
                ndead = 0
            if new_max > 0.0:
                s_grp[nslots] = new_g
                for j in range(nlead):
                    s_lead[j, nslots] = zlead[j]
                s_maxsum[nslots] = 2.0 * new_max
                s_maxd[nslots] = new_max
                s_arg[nslots] = new_arg
                nslots += 1
            else:
                for m in range(nmoved):
                    outd[moved_i[m]] = moved_d[m]
                glen[new_g] = 0
            best, best_i = _argmax_slots(s_maxd, s_arg, nslots, n)
        ints[0], ints[1], ints[2], ints[3] = nslots, ndead, pend, best_i
        flts[0] = best

    @numba.njit(cache=True)
    def _pruned_finish(state):
        """Final d of every point (live groups read from the pool)."""
        pidx, pd, gstart, glen, s_grp, s_maxd, outd, ints = (state[0], state[1], state[4], state[5],
                                                            state[7], state[10], state[12], state[15])
        for q in range(ints[0]):
            if s_maxd[q] >= 0.0:
                g = s_grp[q]
                for p in range(gstart[g], gstart[g] + glen[g]):
                    outd[pidx[p]] = pd[p]
        return outd


def _greedy_numba(grid: np.ndarray, k: int, starts: np.ndarray, d0: np.ndarray, r0: np.ndarray,
                  a0: np.ndarray, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pruned exact greedy on the CPU; returns (chosen indices, final d)."""
    grid = np.ascontiguousarray(grid, dtype=np.float32)
    state = _pruned_init(grid, d0, r0, a0, starts, k)
    chosen = np.empty(k, dtype=np.int64)
    with _progress(k, progress) as bar:
        for t0 in range(0, k, _STEPS_PER_CALL):
            t1 = min(k, t0 + _STEPS_PER_CALL)
            _pruned_steps(grid, state, chosen, t0, t1)
            bar.update(t1 - t0)
    return chosen, _pruned_finish(state)


# --------------------------------------------------------------------------------- torch full-scan path
def _greedy_torch(grid: torch.Tensor, k: int, d0: torch.Tensor, progress: bool,
                  use_graphs: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 full scan per step on grid's device (the GPU path; CPU fallback without numba).

    On CUDA, blocks of steps are captured once in a CUDA graph and replayed: the argmax stays on the
    device, so there is neither a host sync nor a Python-level launch per step.
    """
    z = grid.to(torch.float64)
    sq = (z * z).sum(1)  # exact on the grid
    d = d0.to(device=z.device, dtype=torch.float64).clone()
    c = torch.argmax(d).reshape(1)
    chosen = torch.empty(k, dtype=torch.long, device=z.device)
    use_graphs = z.device.type == "cuda" if use_graphs is None else use_graphs

    def steps(out: torch.Tensor, count: int) -> None:
        for b in range(count):
            out[b : b + 1].copy_(c)
            dc = torch.mv(z, z.index_select(0, c)[0])
            dc = sq - 2.0 * dc + sq.index_select(0, c)
            torch.minimum(d, dc.clamp_(min=0.0).sqrt_(), out=d)
            c.copy_(torch.argmax(d).reshape(1))  # torch.argmax returns the first maximal index

    done = 0
    with _progress(k, progress) as bar:
        if use_graphs and k >= 2 * _GRAPH_STEPS:
            buf = torch.empty(_GRAPH_STEPS, dtype=torch.long, device=z.device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph (real steps: they count)
                steps(chosen[:_GRAPH_STEPS], _GRAPH_STEPS)
            torch.cuda.current_stream().wait_stream(stream)
            done = _GRAPH_STEPS
            bar.update(done)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                steps(buf, _GRAPH_STEPS)
            while k - done >= _GRAPH_STEPS:
                graph.replay()
                chosen[done : done + _GRAPH_STEPS].copy_(buf)
                done += _GRAPH_STEPS
                bar.update(_GRAPH_STEPS)
        while done < k:
            count = min(k - done, _STEPS_PER_CALL)
            steps(chosen[done : done + count], count)
            done += count
            bar.update(count)
    return chosen.cpu().numpy(), d.cpu().numpy()


# ------------------------------------------------------------------------------------------- samplers
def _torch_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {name!r}")
    return getattr(torch, name)


def _progress(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, desc="coreset", unit="pt", leave=False, mininterval=1.0,
                disable=not enabled or not sys.stderr.isatty())


def _coreset_size(n: int, ratio: float) -> int:
    return max(1, int(n * ratio))


def _check_ratio(ratio: float) -> float:
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return float(ratio)


class GreedyCoresetSampler:
    """Approximate greedy k-center over JL-projected features; keeps k = int(N·ratio) rows (at least 1).

    `select` returns the indices in selection order (so a smaller ratio's selection is a prefix) and
    sets `min_distances_` (per point, distance to the nearest chosen centre, projected space) and
    `coverage_radius_` (their maximum: the k-center objective).
    """

    def __init__(self, ratio: float, projection_dim: int = 128, num_starts: int = 10, seed: int = 0,
                 device: str = "cpu", dtype: str = "float32", progress: bool = True) -> None:
        self.ratio = _check_ratio(ratio)
        self.projection_dim = projection_dim
        self.num_starts = num_starts
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self.progress = progress

    def select(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Indices [k] (int64, selection order) of the coreset of `features` [N, D]."""
        n = len(features)
        if n == 0:
            raise DataError("cannot select a coreset from an empty feature bank")
        k = _coreset_size(n, self.ratio)
        if k >= n:  # ratio 1: the whole bank (the official sampler returns it unchanged too)
            self.min_distances_ = np.zeros(n)
            self.coverage_radius_ = 0.0
            return np.arange(n, dtype=np.int64)
        device = self._device()
        feats = features.to(device) if isinstance(features, torch.Tensor) and device.type == "cuda" else features
        if device.type == "cuda" and not isinstance(feats, torch.Tensor):
            feats = torch.as_tensor(np.asarray(feats), device=device)
        grid, scale = to_exact_grid(jl_projection(feats, self.projection_dim, self.seed, self.dtype))
        grid_t = torch.as_tensor(grid)
        starts = _start_indices(n, self.num_starts, self.seed)
        d0, r0, a0 = _initial_state(grid_t, starts)
        if device.type == "cpu" and HAVE_NUMBA:
            chosen, d = _greedy_numba(np.asarray(grid), k, starts, d0.numpy(), r0.numpy(), a0.numpy(),
                                      self.progress)
        else:
            if device.type == "cpu":
                log.warning("numba is not installed: coreset selection uses the slow exact full scan")
            chosen, d = _greedy_torch(grid_t, k, d0, self.progress)
        d = _fix_never_improved(grid_t, chosen, d, d0.cpu().numpy())
        self.min_distances_ = d * scale
        self.coverage_radius_ = float(self.min_distances_.max())
        return chosen

    def _device(self) -> torch.device:
        from patchcore_core.runtime import resolve_device

        return resolve_device(self.device)

    def continue_select(self, selected: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Continue the greedy selection: `selected` [S, D] rows are already chosen (e.g. a fitted memory bank),
        `features` [N, D] are new candidates. Returns indices [k] into `features` in selection order, with
        k = int(N·ratio) (at least 1) as `select` computes it; all N when that is N.

        Both sets go through this sampler's seeded JL projection (the same matrix as `select`), so distances
        are in the space the original selection used; the continuation itself is `continue_greedy`. Sets
        `min_distances_` (per new feature, distance to the nearest row of selected ∪ chosen, projected space)
        and `coverage_radius_` (their maximum).
        """
        n = len(features)
        if n == 0:
            raise DataError("cannot extend a coreset with an empty feature bank")
        k = _coreset_size(n, self.ratio)
        if k >= n:  # ratio 1: every new feature (as `select` keeps the whole bank)
            chosen = np.arange(n, dtype=np.int64)
            self.min_distances_ = np.zeros(n)
        else:
            zs = jl_projection(np.asarray(selected), self.projection_dim, self.seed, self.dtype)
            zc = jl_projection(np.asarray(features), self.projection_dim, self.seed, self.dtype)
            chosen, self.min_distances_ = _continue_greedy(zs, zc, k, self.num_starts, self.seed,
                                                           str(self._device()), self.progress)
        self.coverage_radius_ = float(self.min_distances_.max())
        return chosen


def _fix_never_improved(grid: torch.Tensor, chosen: np.ndarray, d: np.ndarray, d0: np.ndarray) -> np.ndarray:
    """Replace d of points no centre ever improved (d is still the start heuristic) by the true distance.

    Any improvement makes d the exact nearest-centre distance; untouched points are rare in practice.
    """
    todo = np.flatnonzero(d == d0)
    if todo.size == 0:
        return d
    d = d.copy()
    centres = grid[torch.as_tensor(np.unique(chosen), device=grid.device)].to(torch.float64)
    csq = (centres * centres).sum(1)
    chunk = max(1, 2**24 // len(centres))  # rows per block: at most 2^24 distances (128 MiB) at a time
    for lo in range(0, todo.size, chunk):
        rows = grid[torch.as_tensor(todo[lo : lo + chunk], device=grid.device)].to(torch.float64)
        d2 = (rows * rows).sum(1, keepdim=True) - 2.0 * rows @ centres.T + csq
        d[todo[lo : lo + chunk]] = torch.sqrt(torch.clamp(d2.min(1).values, min=0.0)).cpu().numpy()
    return d


class RandomSampler:
    """Uniform random subsampling without replacement (the paper's ablation); sorted indices."""

    def __init__(self, ratio: float, seed: int = 0, **_: object) -> None:
        self.ratio = _check_ratio(ratio)
        self.seed = seed

    def select(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """k = int(N·ratio) distinct indices drawn with the seeded generator."""
        n = len(features)
        k = _coreset_size(n, self.ratio)
        return np.sort(np.random.default_rng(self.seed).choice(n, size=min(k, n), replace=False)).astype(np.int64)


class IdentitySampler:
    """Keep the whole memory bank."""

    def __init__(self, *_: object, **__: object) -> None:
        pass

    def select(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """All indices 0..N-1."""
        return np.arange(len(features), dtype=np.int64)


def make_sampler(method: str, ratio: float, **kwargs):
    """"greedy" | "random" | "none" → a sampler with `select(features) -> indices`."""
    if method == "greedy":
        return GreedyCoresetSampler(ratio, **kwargs)
    if method == "random":
        return RandomSampler(ratio, seed=kwargs.get("seed", 0))
    if method == "none":
        return IdentitySampler()
    raise ValueError(f"coreset method must be 'greedy', 'random' or 'none', got {method!r}")


# ------------------------------------------------------------------------------- incremental continuation
def continue_greedy(selected: np.ndarray, candidates: np.ndarray, k: int, num_starts: int = 10, seed: int = 0,
                    device: str = "cpu", progress: bool = False) -> np.ndarray:
    """Greedy k-center continued from an already-selected set; indices [k] into `candidates`, selection order.

    `selected` [S, d] (S ≥ 1) and `candidates` [N, d] are already projected into one space (e.g. both by
    `jl_projection` with the same seed). Both are snapped to one exact grid (`to_exact_grid` of the union);
    every candidate starts at its exact distance to the nearest selected row, then k times
    c = argmax d (first index on ties), d = min(d, ‖z − z_c‖). On the grid every squared distance is an exact
    float64, so the result is bit for bit the brute-force float64 farthest-point traversal seeded with the
    selected set (numba CPU path and CUDA; the CPU torch fallback steps with torch's float64 sqrt, which on
    some CPUs is not correctly rounded, so a near-tie may resolve differently there). Memory is O(S + N): the
    nearest-selected distances use anchor groups with triangle-inequality pruning (numba) or blocks of at most
    2^22 distances (torch); never an N×S or N×k matrix.
    `num_starts`/`seed` only choose the anchor groups of the pruned kernel (they do not change the result).
    """
    return _continue_greedy(selected, candidates, k, num_starts, seed, device, progress)[0]


def _continue_greedy(selected, candidates, k: int, num_starts: int, seed: int, device: str, progress: bool
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(chosen indices [k], final distance [N] of each candidate to selected ∪ chosen, in input units)."""
    sel, cand = np.asarray(selected), np.asarray(candidates)
    if sel.ndim != 2 or cand.ndim != 2 or sel.shape[1] != cand.shape[1]:
        raise DataError(f"continue_greedy needs [S, d] and [N, d] arrays, got {sel.shape} and {cand.shape}")
    if len(sel) == 0 or len(cand) == 0:
        raise DataError("continue_greedy needs at least one selected row and one candidate")
    n = len(cand)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}] (the number of candidates), got {k}")
    grid, scale = to_exact_grid(np.concatenate([sel, cand]))
    zs, zc = np.ascontiguousarray(grid[: len(sel)]), np.ascontiguousarray(grid[len(sel) :])
    from patchcore_core.runtime import resolve_device

    dev = resolve_device(device)
    if dev.type == "cpu" and HAVE_NUMBA:
        d0 = _nearest_numba(zs, zc)
    else:
        d0 = np.sqrt(_nearest_sq_torch(torch.from_numpy(zs).to(dev), torch.from_numpy(zc).to(dev)).cpu().numpy())
    if k == 0:
        return np.empty(0, dtype=np.int64), d0 * scale
    zc_t = torch.from_numpy(zc)
    if dev.type == "cpu" and HAVE_NUMBA:
        starts = _start_indices(n, num_starts, seed)  # anchors of the pruning groups only
        _, r0, a0 = _initial_state(zc_t, starts)
        chosen, d = _greedy_numba(zc, k, starts, d0, r0.numpy(), a0.numpy(), progress)
    else:
        chosen, d = _greedy_torch(zc_t.to(dev), k, torch.from_numpy(d0), progress)
    return chosen, d * scale


def _nearest_sq_torch(zs: torch.Tensor, zc: torch.Tensor, block: int = 2**22) -> torch.Tensor:
    """Exact float64 *squared* distance of every grid row of `zc` to its nearest grid row of `zs`, in blocks of
    ≤ `block` distances (the GEMM form is exact on the grid). The caller takes np.sqrt: torch's CPU float64
    sqrt (SLEEF, 0.5001 ulp) is not always correctly rounded, numpy's is."""
    sb = min(len(zs), 2**16)
    rows = max(1, block // sb)
    out = torch.full((len(zc),), math.inf, dtype=torch.float64, device=zc.device)
    for lo in range(0, len(zc), rows):
        c = zc[lo : lo + rows].to(torch.float64)
        csq = (c * c).sum(1, keepdim=True)
        for so in range(0, len(zs), sb):
            s = zs[so : so + sb].to(torch.float64)
            d2 = csq - 2.0 * (c @ s.T) + (s * s).sum(1)
            out[lo : lo + rows] = torch.minimum(out[lo : lo + rows], d2.min(1).values)
    return out.clamp_(min=0.0)


def _spread_anchors(zs: np.ndarray, count: int) -> np.ndarray:
    """`count` well-spread row indices of `zs` (farthest-point from row 0, float32; only a pruning heuristic)."""
    z = torch.from_numpy(zs)
    sq = (z * z).sum(1)
    d = torch.full((len(zs),), math.inf)
    out = np.empty(count, dtype=np.int64)
    c = 0
    for t in range(count):
        out[t] = c
        torch.minimum(d, (sq - 2.0 * (z @ z[c]) + sq[c]).clamp_(min=0.0), out=d)
        d[torch.as_tensor(out[: t + 1])] = -1.0  # never the same row twice
        c = int(torch.argmax(d))
    return out


def _nearest_numba(zs: np.ndarray, zc: np.ndarray) -> np.ndarray:
    """Exact float64 nearest-`zs` distance of every `zc` row (grid values): the rows of `zs` are grouped by the
    nearest of ~√S spread anchors; a candidate visits groups nearest-anchor first and skips a group, or a row,
    when the triangle inequality proves it cannot beat the best distance so far."""
    s = len(zs)
    anchors = _spread_anchors(zs, min(s, max(1, int(math.sqrt(s)))))  # √S: fastest of 0.25–8 √S on CNN patches
    za = torch.from_numpy(zs[anchors]).to(torch.float64)
    assign, r = np.empty(s, dtype=np.int64), np.empty(s)
    for lo in range(0, s, 65536):  # exact on the grid (float64 GEMM form)
        b = torch.from_numpy(zs[lo : lo + 65536]).to(torch.float64)
        d2 = (b * b).sum(1, keepdim=True) - 2.0 * (b @ za.T) + (za * za).sum(1)
        m, a = d2.min(1)
        assign[lo : lo + len(b)], r[lo : lo + len(b)] = a.numpy(), np.sqrt(m.clamp_(min=0.0).numpy())
    order = np.lexsort((-r, assign))  # grouped by anchor, each group by r descending
    counts = np.bincount(assign, minlength=len(anchors))
    gstart = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rg = np.ascontiguousarray(r[order])
    gmax = np.where(counts > 0, rg[np.minimum(gstart, s - 1)], -math.inf)
    out = np.empty(len(zc))
    _nearest_pruned(zc, np.ascontiguousarray(zs[anchors]), np.ascontiguousarray(zs[order]), rg, gstart,
                    counts.astype(np.int64), gmax, out)
    return out


if HAVE_NUMBA:

    @numba.njit(fastmath=_FM, cache=True)
    def _nearest_pruned(zc, za, zg, rg, gstart, glen, gmax, out):
        """out[i] = exact min distance of zc[i] to the rows zg (grouped by anchor za[g], r = rg, max r = gmax).

        Squared distances are exact sums on the grid; only the pruning bounds use sqrt, with a relative slack
        of _EPS, so a skipped row can never have been closer."""
        n, dim = zc.shape
        na = za.shape[0]
        da = np.empty(na)
        rmax = 0.0
        for g in range(na):
            rmax = max(rmax, gmax[g])
        for i in range(n):
            best2 = np.inf
            for g in range(na):  # anchors are rows of the set: they bound the answer from above
                acc = 0.0
                for j in range(dim):
                    df = np.float64(zc[i, j]) - np.float64(za[g, j])
                    acc += df * df
                da[g] = math.sqrt(acc)
                best2 = min(best2, acc)
            best = math.sqrt(best2)
            visit = np.argsort(da)
            for u in range(na):
                g = visit[u]
                dg = da[g]
                slack = _EPS * (dg + best)
                if dg - rmax > best + slack:  # groups come by increasing dg: no later one can do better
                    break
                if glen[g] == 0 or dg - gmax[g] > best + slack:
                    continue
                for p in range(gstart[g], gstart[g] + glen[g]):
                    rp = rg[p]
                    if rp > dg + best + slack:  # d(x, y) >= |rp - dg|
                        continue
                    if rp < dg - best - slack:  # r descending: every later row is farther still
                        break
                    acc = 0.0
                    for j in range(dim):
                        df = np.float64(zc[i, j]) - np.float64(zg[p, j])
                        acc += df * df
                    if acc < best2:
                        best2 = acc
                        best = math.sqrt(acc)
                        slack = _EPS * (dg + best)
            out[i] = math.sqrt(best2)
