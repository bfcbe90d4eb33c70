"""Placement for the Python twin of the planner (scheduler/reference.py; C++: cpp/placement.cpp).

Maps every wave's device groups to device ids, wave by wave: continuing groups keep their
devices; the others go where their inputs and their component's parameters are (affinity),
inside one island when they fit one, within device memory, falling back to smaller counts.
The rules and tie-breaks are listed in docs/planner.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .reference import CoreInput

__all__ = ["Placer", "layers_fitting", "GRAD_MB_PER_PARAM_GB", "STATE_MB_PER_PARAM_GB"]

# MB of gradient per GB of ``param_gb`` (weights, gradients and Adam state at 16 bytes per
# parameter, of which the bf16 gradient is 2): what a layer's all-reduce moves.
GRAD_MB_PER_PARAM_GB = 1e3 * 2 / 16
# MB of a layer's state but its gradient per GB of ``param_gb``: what a device that does not
# hold the layer yet would receive when the job switches to the plan (Problem.held_state).
STATE_MB_PER_PARAM_GB = 1e3 * 14 / 16


def layers_fitting(D: float, T: float, cap: int) -> int:
    """The most layers k <= cap with k * T <= D."""
    q = D / T
    k = cap if q >= cap else int(q)
    while k < cap and (k + 1) * T <= D:
        k += 1
    while k > 0 and k * T > D:
        k -= 1
    return k


class Placer:
    """Maps each wave's groups to device ids, wave by wave, tracking memory."""

    def __init__(self, inp: CoreInput, preds: list[list[int]]):
        self.inp = inp
        self.preds = preds
        N = inp.num_devices
        self.used = [0.0] * N
        self.held: dict[tuple[int, int], bytearray] = {}
        self.last_dev: list[list[int]] = [[] for _ in inp.layers]
        self.last_wave = [-1] * len(inp.layers)
        self.comp_last: list[list[int]] = [[] for _ in inp.param_gb]
        self.max_layers = [0] * len(inp.param_gb)
        for m, c in enumerate(inp.component):
            self.max_layers[c] = max(self.max_layers[c], inp.layers[m])
        # With sharded optimizer state: [component][layer] the devices holding it, in the order
        # they took it (each holder's share is 1 / their number; later holders shrink it).
        self.sharded = inp.device_memory_gb >= 0 and inp.shard_fraction > 0
        self.holders: list[list[list[int]]] = (
            [[[] for _ in range(n)] for n in self.max_layers] if self.sharded else [])

    def _slice_cost(self, m: int, b: int, k: int, n: int):
        """d -> (activation GB, parameter GB) that slice [b, b + k) of m adds to device d.

        What does not depend on d is computed once: placement asks this of every free device,
        and most of them hold none of the slice's layers. The sums run in the same order as
        the C++ core's, so the floats are the same."""
        inp = self.inp
        c = inp.component[m]
        act = k * inp.activation_gb[m] / n
        p = inp.param_gb[c]
        if p == 0.0:
            return lambda d: (act, 0.0)
        f = inp.shard_fraction
        sharded = self.sharded
        # A layer d takes will have at least max(n, holders + 1) holders once this slice
        # commits (d and the slice's n devices among them), so d's share is at most 1 / that.
        shares = ([1.0 / max(n, len(self.holders[c][j]) + 1) for j in range(b, b + k)]
                  if sharded else [])

        def param_gb(new: int, share: float) -> float:
            return p * ((1.0 - f) * new + f * share) if sharded else p * new

        share_all = 0.0
        for s in shares:  # not sum(): Python 3.12's float sum() compensates, C++ does not
            share_all += s
        fresh = param_gb(k, share_all)

        def cost(d: int) -> tuple[float, float]:
            held = self.held.get((d, c))
            if held is None or not any(held[b:b + k]):
                return act, fresh
            new, share = 0, 0.0
            for i in range(k):
                if held[b + i]:
                    continue
                new += 1
                if sharded:
                    share += shares[i]
            return act, param_gb(new, share)

        return cost

    def _fitting(self, devices, m: int, b: int, k: int, n: int) -> list[int]:
        """The devices among ``devices`` with room for slice [b, b + k) of m on n devices."""
        if self.inp.device_memory_gb < 0:
            return list(devices)
        cost = self._slice_cost(m, b, k, n)
        limit, used = self.inp.device_memory_gb, self.used
        fitting = []
        for d in devices:
            act, par = cost(d)
            if used[d] + act + par <= limit:
                fitting.append(d)
        return fitting

    def _commit(self, w: int, m: int, b: int, k: int, devices: list[int]) -> None:
        inp = self.inp
        c = inp.component[m]
        if self.sharded and inp.param_gb[c] > 0.0:
            self._commit_sharded(m, b, k, devices)
        elif inp.device_memory_gb >= 0:
            cost = self._slice_cost(m, b, k, len(devices))
            for d in devices:
                act, par = cost(d)
                self.used[d] = self.used[d] + act + par
                self._held_layers(d, c)[b:b + k] = bytes([1]) * k
        self.last_dev[m] = devices
        self.last_wave[m] = w
        self.comp_last[c] = devices

    def _held_layers(self, d: int, c: int) -> bytearray:
        return self.held.setdefault((d, c), bytearray(self.max_layers[c]))

    def _commit_sharded(self, m: int, b: int, k: int, devices: list[int]) -> None:
        """_commit's memory with sharded optimizer state: each holder of a layer keeps 1 / (its
        holders) of that state, so the slice's new holders pay their share of the final count
        and the earlier holders are credited the part the new ones take over."""
        inp = self.inp
        c = inp.component[m]
        p, f, n = inp.param_gb[c], inp.shard_fraction, len(devices)
        helds = [self._held_layers(d, c) for d in devices]
        # Most slices land on devices holding none of their layers: their sums are computed once.
        untouched = [not any(h[b:b + k]) for h in helds]
        all_untouched = all(untouched)
        fresh_count = ([n] * k if all_untouched
                       else [sum(1 for h in helds if not h[b + j]) for j in range(k)])
        act = k * inp.activation_gb[m] / n
        holders = self.holders[c]
        share_untouched = 0.0
        for j in range(k):
            share_untouched += 1.0 / (len(holders[b + j]) + fresh_count[j])
        for d, held, u in zip(devices, helds, untouched):
            if u:
                fresh, share = k, share_untouched
            else:
                fresh, share = 0, 0.0
                for j in range(k):
                    if held[b + j]:
                        continue
                    fresh += 1
                    share += 1.0 / (len(holders[b + j]) + fresh_count[j])
            self.used[d] = self.used[d] + act + p * ((1.0 - f) * fresh + f * share)
        for j in range(k):
            before = len(holders[b + j])
            if before > 0 and fresh_count[j] > 0:
                credit = f * p * (1.0 / before - 1.0 / (before + fresh_count[j]))
                for h in holders[b + j]:
                    self.used[h] = self.used[h] - credit
            holders[b + j].extend(devices if all_untouched else
                                  [d for d, held in zip(devices, helds) if not held[b + j]])
        for held in helds:
            held[b:b + k] = bytes([1]) * k

    def _choose(self, room: list[int], n: int, aff: dict[int, float]) -> list[int]:
        S = self.inp.island_size
        islands: dict[int, list[int]] = {}
        for d in room:  # room is ascending, so every island's list is ascending
            islands.setdefault(d // S, []).append(d)
        aff_sum = {}
        for i, devs in islands.items():
            s = 0.0
            for d in devs:
                s += aff.get(d, 0.0)
            aff_sum[i] = s

        def best_first(devs):
            return sorted(devs, key=lambda d: (-aff.get(d, 0.0), d))

        if n <= S:
            fitting = [i for i in islands if len(islands[i]) >= n]
            if fitting:
                # Most affinity, then the tightest fit (keeps whole islands free), then lowest id.
                i = min(fitting, key=lambda i: (-aff_sum[i], len(islands[i]), i))
                return sorted(best_first(islands[i])[:n])
        chosen: list[int] = []
        for i in sorted(islands, key=lambda i: (-aff_sum[i], -len(islands[i]), i)):
            for d in best_first(islands[i]):
                chosen.append(d)
                if len(chosen) == n:
                    return sorted(chosen)
        raise AssertionError("room holds fewer than n devices")

    def place_wave(self, w: int, groups, done: list[int], rem_layers, D: float):
        """groups: [m, count index, k] in scheduling order. Returns placed
        (m, count index, k, devices) in placement order; groups that cannot fit memory at any
        smaller count are dropped (the scheduler keeps their layers)."""
        inp = self.inp
        N = inp.num_devices
        free = [True] * N
        # Groups that keep their devices: first those that ran in the previous wave at the same
        # count, then those that ran earlier at the same count (if their devices are free).
        same = [g for g in groups if len(self.last_dev[g[0]]) == inp.counts[g[0]][g[1]]]
        cont = sorted((g for g in same if self.last_wave[g[0]] == w - 1), key=lambda g: g[0])
        cont += sorted((g for g in same if self.last_wave[g[0]] < w - 1), key=lambda g: g[0])
        cont_ids = {g[0] for g in cont}
        rest = sorted((g for g in groups if g[0] not in cont_ids),
                      key=lambda g: (-inp.counts[g[0]][g[1]], g[0]))
        placed = []
        for m, ci, k in cont:
            n = inp.counts[m][ci]
            devs = self.last_dev[m]
            if all(free[d] for d in devs) and len(self._fitting(devs, m, done[m], k, n)) == n:
                for d in devs:
                    free[d] = False
                self._commit(w, m, done[m], k, devs)
                placed.append((m, ci, k, devs))
            else:
                rest.append((m, ci, k))  # retried below, after the others, on any devices
        for m, ci, k in rest:
            # Affinity in MB that would not move: the MetaOp's own hidden state (or its
            # predecessors' outputs), the gradient of the k layers it would otherwise
            # synchronise with its component's last group, and, in a re-plan, the k layers'
            # state where the running job keeps it.
            aff: dict[int, float] = {}
            sources = []
            if done[m] > 0:
                sources.append((self.last_dev[m], 1.0 + inp.hidden_mb[m]))
            else:
                for p in self.preds[m]:
                    sources.append((self.last_dev[p], 1.0 + inp.output_mb[p]))
            c = inp.component[m]
            if inp.param_gb[c] > 0.0:
                sources.append((self.comp_last[c], GRAD_MB_PER_PARAM_GB * inp.param_gb[c] * k))
                if inp.held:  # and the state of each of its layers the job holds already
                    held = inp.held[c]
                    for j in range(done[m], min(done[m] + k, len(held))):
                        sources.append((held[j], STATE_MB_PER_PARAM_GB * inp.param_gb[c]))
            for devs, weight in sources:
                for d in devs:
                    aff[d] = aff.get(d, 0.0) + weight
            # Largest count first; on out-of-memory fall back to smaller counts (more
            # activation per device but fewer layers in this wave), else drop the group.
            for cj in range(ci, -1, -1):
                n = inp.counts[m][cj]
                kj = k if cj == ci else layers_fitting(D, inp.times[m][cj], rem_layers(m))
                if kj == 0:
                    break
                room = self._fitting([d for d in range(N) if free[d]], m, done[m], kj, n)
                if len(room) < n:
                    continue
                devs = self._choose(room, n, aff)
                for d in devs:
                    free[d] = False
                self._commit(w, m, done[m], kj, devs)
                placed.append((m, cj, kj, devs))
                break
        return placed
