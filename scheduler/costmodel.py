"""Scalability estimator: how long one layer of a MetaOp takes on n devices.

Three tools, used together or alone:

* `fit_alpha_beta(points)`: the paper's piecewise alpha-beta model
  T(n) = a_i + b_i*c + b'_i*w/n on the piece i that contains n, fitted by least squares from a
  few measured (n, time) points (c: the part that does not split, w: the part that does).
* `AnalyticCost`: a model from FLOPs, bytes, a device's peak rates and an efficiency curve
  that drops for small per-device work, plus the data-parallel gradient all-reduce as the part
  that does not split. Its constants were fitted to a measured H200 profile (see `_H200_FIT`).
* `profile_layer(...)`: times a real pre-LN transformer layer (forward+backward) with torch at
  several local batch sizes on the current device and returns points for `fit_alpha_beta`.

Times are milliseconds; sizes are in elements unless a name says bytes/GB/MB.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # graph.py imports this module; only the type is needed here
    from .graph import Component

__all__ = [
    "A800",
    "H100",
    "H200",
    "PRESETS",
    "RECOMPUTE_FACTOR",
    "SHARDED_STATE_FRACTION",
    "AlphaBeta",
    "AnalyticCost",
    "activation_gb",
    "fit_alpha_beta",
    "layer_flops",
    "layer_params",
    "output_mb",
    "param_gb",
    "preset_for",
    "profile_layer",
    "recomputed",
    "valid_counts",
]

# Mixed-precision Adam keeps bf16 weights and gradients plus fp32 master weights, m and v.
BYTES_PER_PARAM_STATE = 2 + 2 + 4 + 4 + 4
BYTES_BF16 = 2
# ZeRO stage 1 shards the fp32 master weights, m and v among a layer's holders: this share of
# BYTES_PER_PARAM_STATE (a problem's optimizer_shard_fraction)
SHARDED_STATE_FRACTION = (4 + 4 + 4) / BYTES_PER_PARAM_STATE
# Activation checkpointing runs each layer's forward once more in the backward: one forward on
# top of forward + backward (= 3 forwards), for a layer kind that is checkpointed.
RECOMPUTE_FACTOR = 4.0 / 3.0


# --- per-layer sizes -------------------------------------------------------------------------


def _mlp(c: Component) -> int:
    return c.mlp if c.mlp is not None else 4 * c.hidden


def layer_params(c: Component) -> int:
    """Weights of one layer: attention (4 h^2) + MLP (2 h mlp, gated 3 h mlp) for a transformer;
    h x mlp for a linear layer (hidden = in features, mlp = out features); none for a loss."""
    if c.kind == "transformer":
        mlp_mats = 3 if getattr(c, "gated", False) else 2
        return 4 * c.hidden * c.hidden + mlp_mats * c.hidden * _mlp(c)
    if c.kind == "linear":
        return c.hidden * _mlp(c)
    return 0


def layer_flops(c: Component, tokens: float, seq_len: float, gathered: float = 0.0) -> float:
    """Forward+backward FLOPs of one layer over `tokens` tokens (backward = 2x forward).

    Transformer: the matmuls (2 FLOPs per weight per token) plus non-causal attention
    (QK^T and AV: 4*seq_len*hidden per token); this count reproduces the `tflops` column of
    the measured H200 profile exactly. Loss (contrastive): logits of the local embeddings
    against the `gathered` global batch, both directions.
    """
    if c.kind == "transformer":
        fwd = tokens * (2 * layer_params(c) + 4 * seq_len * c.hidden)
    elif c.kind == "linear":
        fwd = tokens * 2 * layer_params(c)
    else:
        fwd = 2 * 2 * tokens * gathered * c.hidden
    return 3.0 * fwd


def _activation_bytes_per_token(c: Component) -> float:
    # Korthikanti et al. 2022 ("Reducing activation recomputation"), bf16, FlashAttention (no
    # s^2 term): attention 11h + LayerNorms 4h + MLP 3h + 4*mlp bytes stored per token (a gated
    # MLP keeps gate, up and product: 6*mlp).
    if c.kind == "transformer":
        return 18 * c.hidden + (6 if getattr(c, "gated", False) else 4) * _mlp(c)
    if c.kind == "linear":
        return BYTES_BF16 * (c.hidden + _mlp(c))
    return BYTES_BF16 * c.hidden


def param_gb(c: Component) -> float:
    """Weights, gradients and Adam state of one layer (16 bytes per parameter), GB."""
    return layer_params(c) * BYTES_PER_PARAM_STATE / 1e9


def recomputed(c: Component) -> bool:
    """Whether activation checkpointing recomputes this kind of layer (every layer with
    weights; a loss keeps what it keeps)."""
    return c.kind != "loss"


def activation_gb(c: Component, batch: int, seq_len: int, layers: int = 1,
                  checkpointing: bool = False) -> float:
    """Activations one layer keeps for backward over the whole batch, GB.

    With ``checkpointing`` a layer keeps only its input (bf16, hidden wide) and the backward
    rebuilds one layer's activations at a time: of a MetaOp's ``layers`` layers, each is
    charged its input plus 1/layers of one layer's full activations, so that the MetaOp's
    total is its inputs plus one layer's recompute."""
    full = batch * seq_len * _activation_bytes_per_token(c) / 1e9
    if not (checkpointing and recomputed(c)):
        return full
    if layers < 1:
        raise ValueError(f"layers: expected >= 1, got {layers}")
    return batch * seq_len * c.hidden * BYTES_BF16 / 1e9 + full / layers


def output_mb(c: Component, batch: int, out_tokens: int) -> float:
    """The bf16 activation a component hands to its successors, MB."""
    width = _mlp(c) if c.kind == "linear" else c.hidden
    return batch * out_tokens * width * BYTES_BF16 / 1e6


def valid_counts(batch: int, max_devices: int) -> list[int]:
    """Device counts data parallelism admits: n divides the batch, 1 <= n <= max_devices."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if max_devices < 1:
        raise ValueError(f"max_devices must be >= 1, got {max_devices}")
    return [n for n in range(1, min(batch, max_devices) + 1) if batch % n == 0]


# --- analytic model --------------------------------------------------------------------------

# Constants fitted by least squares on log time to every point of
# bench/results/h200_layer_profile.json (9 layers x 8-9 local batches, H200, torch 2.11,
# bf16, eager, SDPA; tests/test_costmodel.py re-checks them against the file when present):
# compute = (floor^p + gpu^p)^(1/p), gpu = FLOPs/(peak*mm_efficiency) + traffic_factor *
# stored-activation bytes / HBM bandwidth. Median error 4.4%, every point above 4 ms within
# 6%; the misses (up to 40%) are in the launch-bound floor, where the profile itself scatters
# between 1.34 and 2.89 ms for the same layer.
_H200_FIT = dict(floor_ms=1.73, floor_exponent=2.48, mm_efficiency=0.739, traffic_factor=12.23)

# Launch-bound floors of the light kinds relative to a transformer layer's (which launches some
# 60 kernels forward+backward): an estimate from kernel counts, not a measurement.
_FLOOR_SHARE = {"transformer": 1.0, "linear": 0.1, "loss": 0.25}


@dataclass(frozen=True)
class AnalyticCost:
    """Per-layer time from FLOPs and bytes on one kind of device, plus gradient all-reduce.

    compute(t) = (floor^p + gpu(t)^p)^(1/p) with gpu(t) = FLOPs/(peak*mm_efficiency) +
    traffic_factor * activation bytes / hbm: a smooth maximum of the launch-bound floor of
    eager PyTorch and the device time, so the achieved efficiency gpu/compute drops towards 0
    as per-device work shrinks. The part that does not split is the ring all-reduce of the
    layer's bf16 gradients over the n data-parallel devices: 2(n-1)/n * bytes / bus bandwidth
    (NVLink inside an island, the network across islands) + 2(n-1) link latencies.
    """

    name: str = "A800"
    peak_tflops: float = 312.0  # dense bf16
    hbm_tbs: float = 2.0
    mm_efficiency: float = _H200_FIT["mm_efficiency"]
    traffic_factor: float = _H200_FIT["traffic_factor"]
    floor_ms: float = _H200_FIT["floor_ms"]
    floor_exponent: float = _H200_FIT["floor_exponent"]
    island_size: int = 8
    intra_gbs: float = 150.0  # all-reduce bus bandwidth inside an island (NVLink), GB/s
    inter_gbs: float = 45.0  # across islands (A800 cluster: 400 Gb/s InfiniBand per node)
    link_latency_us: float = 8.0
    # activation checkpointing: layers that recompute (``recomputed``) take RECOMPUTE_FACTOR
    # times their compute, FLOPs and fitted overheads alike; the sync does not change
    recompute: bool = False

    def __post_init__(self):
        for f in ("peak_tflops", "hbm_tbs", "mm_efficiency", "traffic_factor", "floor_exponent",
                  "intra_gbs", "inter_gbs"):
            if not getattr(self, f) > 0:
                raise ValueError(f"AnalyticCost.{f} must be > 0, got {getattr(self, f)}")
        if self.mm_efficiency > 1:
            raise ValueError(f"AnalyticCost.mm_efficiency must be <= 1, got {self.mm_efficiency}")
        if self.floor_ms < 0 or self.link_latency_us < 0:
            raise ValueError("AnalyticCost.floor_ms and link_latency_us must be >= 0")
        if self.island_size < 1:
            raise ValueError(f"AnalyticCost.island_size must be >= 1, got {self.island_size}")

    def with_(self, **changes) -> AnalyticCost:
        """A copy with some constants changed (e.g. `A800.with_(island_size=4)`)."""
        return replace(self, **changes)

    def compute_ms(self, c: Component, tokens_per_device: float, seq_len: float | None = None,
                   n_devices: int = 1) -> float:
        """Forward+backward of one layer over the local tokens of one device, no communication
        (with ``recompute``, the recomputed forward too)."""
        if tokens_per_device < 0:
            raise ValueError(f"tokens_per_device must be >= 0, got {tokens_per_device}")
        seq = tokens_per_device if seq_len is None else seq_len
        flops = layer_flops(c, tokens_per_device, seq, gathered=tokens_per_device * n_devices)
        act_bytes = tokens_per_device * _activation_bytes_per_token(c)
        gpu = (flops / (self.peak_tflops * 1e12 * self.mm_efficiency)
               + self.traffic_factor * act_bytes / (self.hbm_tbs * 1e12)) * 1e3
        floor = self.floor_ms * _FLOOR_SHARE[c.kind]
        p = self.floor_exponent
        ms = (floor**p + gpu**p) ** (1.0 / p)
        return ms * RECOMPUTE_FACTOR if self.recompute and recomputed(c) else ms

    def efficiency(self, c: Component, tokens_per_device: float,
                   seq_len: float | None = None) -> float:
        """Achieved share of the device's matmul peak, in (0, mm_efficiency]."""
        seq = tokens_per_device if seq_len is None else seq_len
        ideal_ms = layer_flops(c, tokens_per_device, seq) / (self.peak_tflops * 1e9)
        return ideal_ms / self.compute_ms(c, tokens_per_device, seq_len)

    def sync_ms(self, c: Component, n_devices: int, tokens_per_device: float = 0.0) -> float:
        """The part that does not split: gradient all-reduce (a loss: embedding all-gather)."""
        if n_devices <= 1:
            return 0.0
        if c.kind == "loss":
            nbytes = tokens_per_device * n_devices * c.hidden * BYTES_BF16
            ring = (n_devices - 1) / n_devices
        else:
            nbytes = layer_params(c) * BYTES_BF16
            ring = 2 * (n_devices - 1) / n_devices
        gbs = self.intra_gbs if n_devices <= self.island_size else self.inter_gbs
        hops = 2 * (n_devices - 1) if c.kind != "loss" else n_devices - 1
        return ring * nbytes / (gbs * 1e9) * 1e3 + hops * self.link_latency_us * 1e-3

    def layer_ms(self, c: Component, tokens_per_device: float, n_devices: int,
                 seq_len: float | None = None) -> float:
        """Time of one layer (forward+backward + its non-splitting sync) on one of n devices.

        `seq_len` (tokens per sample) sets the attention cost; None treats the local tokens as
        one sequence.
        """
        if n_devices < 1:
            raise ValueError(f"n_devices must be >= 1, got {n_devices}")
        return (self.compute_ms(c, tokens_per_device, seq_len, n_devices)
                + self.sync_ms(c, n_devices, tokens_per_device))

    def time_table(self, c: Component, batch: int, seq_len: int,
                   max_devices: int) -> dict[int, float]:
        """time_ms of a MetaOp for every valid device count (data parallel over the batch).

        Giving a MetaOp more devices never makes it slower in the table: where more devices
        would be slower (floor plus a longer all-reduce), the extra devices are modelled as
        idling, i.e. the time of the best smaller count. This favours the baselines, which
        put light MetaOps on many devices.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        table: dict[int, float] = {}
        best = math.inf
        for n in valid_counts(batch, max_devices):
            best = min(best, self.layer_ms(c, batch // n * seq_len, n, seq_len))
            table[n] = best
        return table


A800 = AnalyticCost()
# H200 SXM: 989 TFLOP/s dense bf16, 4.8 TB/s HBM3e, NVLink4; the network (8 x 400 Gb/s per
# node) is an assumption, not a measurement.
H200 = AnalyticCost(name="H200", peak_tflops=989.0, hbm_tbs=4.8, intra_gbs=360.0, inter_gbs=180.0)
# H100 SXM: the H200's compute with 3.35 TB/s HBM3 (same NVLink4; network assumed alike).
H100 = H200.with_(name="H100", hbm_tbs=3.35)
PRESETS = {"A800": A800, "H100": H100, "H200": H200}


def preset_for(device_name: str) -> AnalyticCost:
    """The preset whose name appears in ``device_name`` (e.g. ``torch.cuda.get_device_name()``),
    else A800 (the paper's cluster)."""
    upper = device_name.upper()
    for name, preset in PRESETS.items():
        if name in upper:
            return preset
    return A800


# --- piecewise alpha-beta fit ----------------------------------------------------------------


@dataclass(frozen=True)
class AlphaBeta:
    """Fitted piecewise model. pieces[i] = (n_lo, n_hi, a, b, b2): T(n) = a + b*c + b2*w/n
    for n_lo <= n <= n_hi (the first piece also covers smaller n, the last larger n)."""

    pieces: tuple[tuple[int, int, float, float, float], ...]

    def __call__(self, n: float, c: float = 0.0, w: float = 1.0) -> float:
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        piece = self.pieces[-1]
        for p in self.pieces:
            if n <= p[1]:
                piece = p
                break
        _, _, a, b, b2 = piece
        return a + b * c + b2 * w / n

    def time_table(self, counts: Iterable[int], c: float = 0.0, w: float = 1.0) -> dict[int, float]:
        """{n: T(n)} for the given device counts, ascending."""
        return {n: self(n, c, w) for n in sorted(counts)}


def fit_alpha_beta(points: Sequence[Sequence[float]], breaks: Sequence[int] = ()) -> AlphaBeta:
    """Least-squares fit of the piecewise alpha-beta model.

    points: (n, time) pairs of one MetaOp, fitting T(n) = a_i + b'_i/n (c = 0, w = 1); or
        (n, c, w, time) rows of several MetaOps on the same hardware, fitting a_i, b_i, b'_i
        (where c does not vary inside a piece, b_i is not identifiable: it is 0 and a_i
        absorbs b_i*c).
    breaks: ascending device counts at which a new piece starts (e.g. (9,) to separate one
        8-device island from the network). Each piece needs at least as many points with
        distinct n (or distinct (c, w/n)) as it has unknowns.
    """
    rows = [tuple(float(v) for v in p) for p in points]
    if not rows:
        raise ValueError("points is empty")
    width = len(rows[0])
    if width not in (2, 4) or any(len(r) != width for r in rows):
        raise ValueError("points must all be (n, time) or all (n, c, w, time)")
    if width == 2:
        rows = [(n, 0.0, 1.0, t) for n, t in rows]
    if any(r[0] <= 0 for r in rows):
        raise ValueError("points: every n must be > 0")
    if any(not math.isfinite(v) for r in rows for v in r):
        raise ValueError("points must be finite")
    cuts = list(breaks)
    if cuts != sorted(set(cuts)) or any(b <= 1 for b in cuts):
        raise ValueError(f"breaks must be ascending distinct counts > 1, got {tuple(breaks)}")
    edges = [0, *cuts, math.inf]
    pieces = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = np.array([r for r in rows if lo <= r[0] < hi], dtype=np.float64).reshape(-1, 4)
        n, c, w, t = sel.T
        cols = [np.ones_like(n), c, w / n]
        use_c = bool(np.ptp(c) > 0) if len(c) else False
        design = np.stack(cols if use_c else [cols[0], cols[2]], axis=1)
        if len(sel) == 0 or np.linalg.matrix_rank(design) < design.shape[1]:
            raise ValueError(f"points: the piece n in [{lo}, {hi}) has too few distinct points "
                             f"to fit {design.shape[1]} coefficients")
        coef, *_ = np.linalg.lstsq(design, t, rcond=None)
        a, b, b2 = (coef[0], coef[1], coef[2]) if use_c else (coef[0], 0.0, coef[1])
        n_hi = int(hi - 1) if math.isfinite(hi) else int(n.max())
        pieces.append((int(max(lo, 1)), n_hi, float(a), float(b), float(b2)))
    return AlphaBeta(tuple(pieces))


# --- profiler --------------------------------------------------------------------------------


def _transformer_layer(hidden: int, heads: int, mlp: int):
    import torch
    import torch.nn.functional as F

    class PreLNLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = torch.nn.LayerNorm(hidden)
            self.qkv = torch.nn.Linear(hidden, 3 * hidden)
            self.proj = torch.nn.Linear(hidden, hidden)
            self.ln2 = torch.nn.LayerNorm(hidden)
            self.fc1 = torch.nn.Linear(hidden, mlp)
            self.fc2 = torch.nn.Linear(mlp, hidden)

        def forward(self, x_BSH):
            b, s, h = x_BSH.shape
            q, k, v = self.qkv(self.ln1(x_BSH)).view(b, s, 3, heads, h // heads).unbind(2)
            att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2))
            x_BSH = x_BSH + self.proj(att.transpose(1, 2).reshape(b, s, h))
            return x_BSH + self.fc2(F.gelu(self.fc1(self.ln2(x_BSH))))

    return PreLNLayer()


def profile_layer(hidden: int, heads: int, mlp: int | None, seq_len: int, batches: Sequence[int],
                  device=None, dtype=None, global_batch: int | None = None, repeats: int = 3,
                  warmup: int = 1) -> list[tuple[int, float]]:
    """Time forward+backward of one pre-LN transformer layer (SDPA attention, GELU MLP).

    hidden, heads, mlp (None: 4*hidden), seq_len: the layer and tokens per sample.
    batches: local batch sizes to time; each must divide `global_batch` (default: the largest).
    device, dtype: torch device and dtype (default: cuda + bf16 when present, else cpu + fp32).
    Returns [(n, median ms)] with n = global_batch / local batch, the device count that gives
    each device that local batch: points for `fit_alpha_beta`. Communication is not included.
    """
    import torch

    if hidden < 1 or heads < 1 or hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a positive multiple of heads ({heads})")
    mlp = 4 * hidden if mlp is None else mlp
    if mlp < 1 or seq_len < 1:
        raise ValueError(f"mlp and seq_len must be >= 1, got {mlp} and {seq_len}")
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"batches must be non-empty positive sizes, got {list(batches)}")
    global_batch = max(batches) if global_batch is None else global_batch
    if any(global_batch % b for b in batches):
        raise ValueError(f"every local batch in {list(batches)} must divide "
                         f"global_batch={global_batch}")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = _transformer_layer(hidden, heads, mlp).to(device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    points = []
    for b in sorted(set(batches)):
        x = torch.randn(b, seq_len, hidden, device=device, dtype=dtype, requires_grad=True)
        times = []
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            layer(x).sum().backward()
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        points.append((global_batch // b, float(np.median(times))))
    return sorted(points)
