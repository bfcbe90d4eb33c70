"""Type stub of the C++ planner core (cpp/, built by CMake into scheduler/_core)."""

from typing import overload

class GraphError(ValueError): ...

def topological_order(num_nodes: int, edges: list[tuple[int, int]]) -> list[int]: ...
def metalevels(num_nodes: int, edges: list[tuple[int, int]]) -> list[int]: ...
def contract(
    num_nodes: int, keys: list[int], edges: list[tuple[int, int]]
) -> tuple[list[list[int]], list[tuple[int, int]]]: ...

class PlanningError(ValueError): ...
class PlanMemoryError(PlanningError): ...

class PlannerInput:
    """The arrays of scheduler.reference.CoreInput converted to C++ once (scheduler.planner
    keeps one per Problem); checked when planned."""

    def __init__(
        self, num_devices: int, island_size: int, names: list[str], layers: list[int],
        counts: list[list[int]], times: list[list[float]], component: list[int],
        param_gb: list[float], activation_gb: list[float], output_mb: list[float],
        hidden_mb: list[float], flows: list[tuple[int, int]], device_memory_gb: float,
        shard_fraction: float = 0.0, held: list[list[list[int]]] = ...,
    ) -> None: ...

def plan(
    input: PlannerInput, method: str, backend: str, options: dict, overlap_levels: bool,
    least_idle: bool, single_tuple: bool, portfolio: bool, defer_short: bool,
) -> tuple[dict, float]: ...
@overload
def plan_core(
    input: PlannerInput, overlap_levels: bool, least_idle: bool, single_tuple: bool,
    portfolio: bool, defer_short: bool = False,
) -> dict: ...
@overload
def plan_core(
    num_devices: int, island_size: int, names: list[str], layers: list[int],
    counts: list[list[int]], times: list[list[float]], component: list[int],
    param_gb: list[float], activation_gb: list[float], output_mb: list[float],
    hidden_mb: list[float], flows: list[tuple[int, int]], device_memory_gb: float,
    overlap_levels: bool,
    least_idle: bool, single_tuple: bool, portfolio: bool, defer_short: bool = False,
    shard_fraction: float = 0.0, held: list[list[list[int]]] = ...,
) -> dict: ...
