"""Random planning problems (problem JSON dicts) for tests and benchmarks.

Times follow an alpha-beta curve T(n) = a + w / n (+ noise, then made non-increasing), so
they look like profiled layers: light MetaOps stop scaling early, heavy ones scale far. Flows
join random earlier MetaOps to later ones (a random DAG with a hidden topological order).
"""

from __future__ import annotations

import random

__all__ = ["random_problem"]

_POW2 = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def random_problem(seed: int | random.Random, num_metaops: int, num_devices: int, *,
                   island_size: int = 8, avg_out_degree: float = 1.5,
                   memory: bool = False, shared_components: bool = True) -> dict:
    """A random problem dict with ``num_metaops`` MetaOps on ``num_devices`` devices.

    Args:
        seed: an int or a ``random.Random``.
        avg_out_degree: expected flows per MetaOp (to later MetaOps).
        memory: give ``device_memory_gb`` (tight enough that placement must care) and sizes.
        shared_components: let several MetaOps share a component (parameters).
    """
    if num_metaops < 1 or num_devices < 1:
        raise ValueError(f"num_metaops and num_devices must be >= 1, got {num_metaops}, "
                         f"{num_devices}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    n_comp = max(1, num_metaops // 2) if shared_components else num_metaops
    metaops = []
    for i in range(num_metaops):
        counts = [c for c in _POW2 if c <= num_devices and (c == 1 or rng.random() < 0.7)]
        if rng.random() < 0.15:  # an odd valid set (e.g. divisors of a batch), not starting at 1
            counts = sorted({rng.randint(1, num_devices) for _ in range(rng.randint(1, 3))})
        a = rng.uniform(0.05, 2.0)                  # the floor that does not split
        w = a * rng.choice((0.5, 5.0, 50.0, 500.0))  # the work that splits
        times, prev = {}, None
        for c in counts:
            t = a + w / c + rng.uniform(0.0, 0.05 * a)
            t = t if prev is None else min(t, prev)
            times[str(c)] = round(t, 6) if round(t, 6) > 0 else t
            prev = times[str(c)]
        comp = rng.randrange(n_comp) if shared_components else i
        metaops.append({
            "name": f"op{i}", "task": f"t{i % 7}", "component": f"c{comp}",
            "layers": rng.choice((1, 2, 6, 12, 24, 32, 48)) if rng.random() < 0.8
            else rng.randint(1, 64),
            "time_ms": times,
            "param_gb": rng.uniform(0.0, 0.4) if memory else 0.0,
            "activation_gb": rng.uniform(0.0, 4.0) if memory else 0.0,
            "output_mb": rng.uniform(0.0, 200.0),
        })
    perm = list(range(num_metaops))
    rng.shuffle(perm)  # hidden topological order, so indices are not already sorted
    flows = set()
    for pos in range(num_metaops - 1):
        drawn = int(rng.expovariate(1.0 / avg_out_degree)) if avg_out_degree > 0 else 0
        k = min(num_metaops - pos - 1, drawn)
        for _ in range(k):
            dst = rng.randint(pos + 1, min(num_metaops - 1, pos + 1 + max(4, num_metaops // 8)))
            flows.add((perm[pos], perm[dst]))
    problem = {
        "num_devices": num_devices, "island_size": island_size, "metaops": metaops,
        "flows": [[f"op{s}", f"op{t}"] for s, t in sorted(flows)],
    }
    if memory:
        # Room for about three times the least a plan needs, so placement has to balance.
        need = sum(m["layers"] * (m["param_gb"] + m["activation_gb"]) for m in metaops)
        per_layer = max(m["param_gb"] + m["activation_gb"] for m in metaops)
        problem["device_memory_gb"] = round(max(3.0 * need / num_devices, 2.0 * per_layer, 1.0), 3)
    return problem
