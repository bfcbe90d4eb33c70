"""Cluster simulator: arithmetic checked against hand-computed cases."""

from __future__ import annotations

import pytest

from scheduler.simulate import Cluster, align_layout, allreduce_ms, reshard_bytes, simulate


def op(name, layers, time_ms, component=None, param_gb=0.0, output_mb=0.0):
    return {"name": name, "task": name.split("/")[0], "component": component or name.split("/")[-1],
            "layers": layers, "time_ms": {str(k): v for k, v in time_ms.items()},
            "param_gb": param_gb, "output_mb": output_mb}


def sl(name, lb, le, devices):
    return {"metaop": name, "layer_begin": lb, "layer_end": le, "devices": devices}


def plan_of(*waves):
    return {"method": "hand", "waves": [{"start_ms": float(i), "duration_ms": 1.0, "slices": list(w)}
                                        for i, w in enumerate(waves)]}


# Round numbers so the hand arithmetic is exact: NVLink 100 GB/s, network 10 GB/s (MB/(GB/s) = ms).
CL = Cluster(devices_per_node=2, intra_gbps=100.0, inter_gbps=10.0,
             intra_latency_us=5.0, inter_latency_us=10.0)


def test_one_wave():
    problem = {"num_devices": 4, "island_size": 4, "metaops": [
        op("t1/a", 4, {1: 10.0, 2: 6.0, 4: 4.0}, param_gb=0.8),
        op("t2/b", 2, {1: 3.0, 2: 2.0})]}
    plan = plan_of([sl("t1/a", 0, 4, [0, 1]), sl("t2/b", 0, 2, [2, 3])])
    # By default time_ms holds a group's own all-reduce: one group per layer, nothing to add.
    sim = simulate(problem, plan, Cluster(devices_per_node=4))
    assert sim.compute_per_wave_ms == [24.0]           # max(4 x 6, 2 x 2)
    assert sim.transfer_ms == 0.0 and sim.sync_ms == 0.0
    assert sim.iteration_ms == pytest.approx(24.0)
    assert sim.device_busy_ms() == [24.0, 24.0, 4.0, 4.0]

    # Pure-compute times: a's 4 layers x 0.8 GB x 1/8 (the gradient) = 400 MB, ring over 2
    # devices in one node: 2 (2-1)/2 x 400 MB / 200 GB/s = 2 ms, plus 2 steps x 5 us.
    cl = Cluster(devices_per_node=4, intra_gbps=200.0, group_sync_in_times=False)
    sim = simulate(problem, plan, cl)
    assert sim.sync_ms == pytest.approx(2.01)
    assert sim.iteration_ms == pytest.approx(26.01)
    assert sim.sync_per_device_ms == pytest.approx([2.01, 2.01, 0.0, 0.0])


def test_two_waves_cross_node_transfer():
    problem = {"num_devices": 4, "island_size": 2, "metaops": [
        op("t/a", 2, {2: 5.0}, output_mb=40.0), op("t/b", 1, {1: 4.0, 2: 3.0})],
        "flows": [["t/a", "t/b"]]}
    plan = plan_of([sl("t/a", 0, 2, [0, 1])], [sl("t/b", 0, 1, [2, 3])])
    sim = simulate(problem, plan, CL)
    # 0->2 and 1->3 move 20 MB each, both leave node 0 for node 1: 40 MB / 10 GB/s = 4 ms + 10 us,
    # once forward (activations) and once backward (their gradients).
    assert sim.waves[1].transfer_ms == pytest.approx(8.02)
    assert sim.transfer_mb == pytest.approx(40.0)
    assert sim.compute_ms == pytest.approx(13.0)
    assert sim.iteration_ms == pytest.approx(21.02)
    assert sim.waves[1].compute_start_ms == pytest.approx(18.02)
    assert sim.transfer_fraction == pytest.approx(8.02 / 21.02)

    same = simulate(problem, plan_of([sl("t/a", 0, 2, [0, 1])], [sl("t/b", 0, 1, [1, 0])]), CL)
    assert same.transfer_ms == 0.0 and same.iteration_ms == pytest.approx(13.0)

    # Re-shard 2 -> 1 inside a node: only device 1's 20 MB moves, over NVLink.
    shrink = simulate(problem, plan_of([sl("t/a", 0, 2, [0, 1])], [sl("t/b", 0, 1, [0])]), CL)
    assert shrink.transfer_ms == pytest.approx(2 * (20.0 / 100.0 + 0.005))


def test_split_metaop_moves_its_hidden_state():
    problem = {"num_devices": 4, "island_size": 2,
               "metaops": [op("t/a", 4, {1: 2.0, 2: 1.5}, output_mb=10.0)]}
    plan = plan_of([sl("t/a", 0, 1, [0])], [sl("t/a", 1, 4, [2, 3])])
    sim = simulate(problem, plan, CL)
    # 1 -> 2 devices across nodes: 5 MB to each, 10 MB out of node 0's link.
    assert sim.transfer_ms == pytest.approx(2 * (10.0 / 10.0 + 0.01))
    assert sim.compute_ms == pytest.approx(2.0 + 3 * 1.5)
    # With stored activations the hidden state is estimated as 1/17 of them: 3.4 GB -> 200 MB.
    problem["metaops"][0]["activation_gb"] = 3.4
    sim = simulate(problem, plan, CL)
    assert sim.transfer_ms == pytest.approx(2 * (200.0 / 10.0 + 0.01))
    # A problem that gives hidden_mb is taken at its word.
    problem["metaops"][0]["hidden_mb"] = 30.0
    sim = simulate(problem, plan, CL)
    assert sim.transfer_ms == pytest.approx(2 * (30.0 / 10.0 + 0.01))


def test_shared_parameter_synchronised_over_two_groups():
    # Component "enc" runs for t1 on node 0 and for t2 on node 1: one all-reduce over all four.
    problem = {"num_devices": 4, "island_size": 2, "metaops": [
        op("t1/enc", 3, {2: 1.0}, param_gb=0.8), op("t2/enc", 3, {2: 1.0}, param_gb=0.8),
        op("t1/head", 1, {1: 1.0}, param_gb=0.8)]}
    plan = plan_of([sl("t1/enc", 0, 3, [0, 1]), sl("t2/enc", 0, 3, [2, 3])],
                   [sl("t1/head", 0, 1, [0])])
    sim = simulate(problem, plan, CL)
    # 3 layers x 100 MB = 300 MB. In node (g=2): 2 (1/2) 300 / 100 = 3 ms + 2 x 5 us;
    # across k=2 nodes: 2 (1/2) 300 / 10 = 30 ms + 2 x 10 us. The head on one device: no sync.
    assert [b["component"] for b in sim.sync_buckets] == ["enc"]
    assert sim.sync_buckets[0]["mb"] == pytest.approx(300.0)
    assert sim.sync_ms == pytest.approx(3.01 + 30.02)
    assert sim.iteration_ms == pytest.approx(3.0 + 1.0 + 33.03)

    # The same groups inside one 4-device island: one NVLink ring, 2 (3/4) 300 / 100 + 6 x 5 us.
    one_node = simulate(problem, plan, Cluster(devices_per_node=4, intra_gbps=100.0))
    assert one_node.sync_ms == pytest.approx(4.5 + 0.03)


def test_disjoint_all_reduces_run_concurrently():
    problem = {"num_devices": 4, "island_size": 4, "metaops": [
        op("t1/x", 1, {2: 1.0}, param_gb=0.8), op("t2/y", 1, {2: 1.0}, param_gb=0.8)]}
    plan = plan_of([sl("t1/x", 0, 1, [0, 1]), sl("t2/y", 0, 1, [2, 3])])
    sim = simulate(problem, plan, Cluster(devices_per_node=4, intra_gbps=100.0,
                                          group_sync_in_times=False))
    assert sim.sync_ms == pytest.approx(100.0 / 100.0 + 0.01)  # not twice that


def test_reshard_bytes_by_hand():
    # 60 MB from 3 devices (20 each) to 2 (30 each): device 1 keeps 10 of its 20, sends 10 to 0;
    # device 2 sends all 20 to 1.
    assert reshard_bytes([0, 1, 2], [0, 1], 60.0) == [(1, 0, pytest.approx(10.0)),
                                                      (2, 1, pytest.approx(20.0))]
    assert reshard_bytes([3, 1], [3, 1], 8.0) == []
    assert reshard_bytes([3, 1], [1, 3], 8.0) == [(3, 1, 4.0), (1, 3, 4.0)]


def test_align_layout_keeps_data_in_place():
    node = CL.node  # 2 devices per node
    assert align_layout([3, 1], [1, 3], node) == [3, 1]          # same devices: nothing moves
    assert align_layout([0, 1], [1, 2], node) == [2, 1]          # device 1 keeps its half
    # Growing 2 -> 4: each old device keeps the half of its shard at the matching position; the
    # new shards go to free devices on the node of the device they come from.
    assert align_layout([0, 2], [0, 1, 2, 3], node) == [0, 1, 2, 3]
    assert align_layout([2, 0], [0, 1, 2, 3], node) == [2, 3, 0, 1]
    # Shrinking 4 -> 1 onto a device of the group: it keeps its own quarter.
    assert align_layout([4, 5, 6, 7], [6], node) == [6]
    layout = align_layout([0, 1, 2], [5, 1, 4], node)
    assert sorted(layout) == [1, 4, 5] and layout[1] == 1


def test_shards_stay_on_devices_that_keep_running_the_metaop():
    problem = {"num_devices": 4, "island_size": 4,
               "metaops": [op("t/a", 2, {2: 1.0}, output_mb=40.0)]}
    plan = plan_of([sl("t/a", 0, 1, [0, 1])], [sl("t/a", 1, 2, [1, 2])])
    sim = simulate(problem, plan, Cluster(devices_per_node=4, intra_gbps=100.0))
    # Device 1 keeps its half (in sorted order it would have to pass it on to device 2).
    assert sim.transfer_mb == pytest.approx(20.0)
    assert sim.transfer_ms == pytest.approx(2 * (20.0 / 100.0 + 0.005))


def test_allreduce_by_hand():
    assert allreduce_ms([5], 100.0, CL) == (0.0, 0.0)
    # Devices 0, 1 on node 0 and 2 on node 1 (2 per node): g = 2 in the node, k = 2 nodes.
    intra, inter = allreduce_ms([0, 1, 2], 300.0, CL)
    assert intra == pytest.approx(2 * 1 / 2 * 300.0 / 100.0 + 2 * 1 * 0.005)
    assert inter == pytest.approx(2 * 1 / 2 * 300.0 / 10.0 + 2 * 1 * 0.010)


def test_lenient_replay_of_a_plan_on_other_data():
    problem = {"num_devices": 4, "island_size": 4,
               "metaops": [op("t/a", 2, {1: 4.0, 4: 1.0})]}
    plan = plan_of([sl("t/a", 0, 2, [0, 1]), sl("gone/b", 0, 5, [2])])
    with pytest.raises(ValueError, match="gone/b"):
        simulate(problem, plan_of([sl("t/a", 0, 2, [0]), sl("gone/b", 0, 5, [2])]))
    sim = simulate(problem, plan, strict=False)
    # 2 devices is not a valid count: interpolated between 1 (4 ms) and 4 (1 ms) -> 3 ms/layer.
    assert sim.compute_ms == pytest.approx(6.0)


@pytest.mark.parametrize("slices, match", [
    ([sl("t/a", 0, 2, [0, 4])], "device 4"),
    ([sl("t/a", 0, 1, [0]), sl("t/a", 1, 2, [0])], "device 0 twice"),
    ([sl("t/a", 0, 2, [0, 1, 2])], "valid count"),
    ([sl("t/a", 0, 1, [0])], "1 of its 2 layers"),
    ([sl("t/a", 0, 3, [0])], "layers"),
    ([sl("t/a", 1, 2, [0]), sl("t/a", 0, 1, [1])], "in order"),
])
def test_bad_plans_raise(slices, match):
    problem = {"num_devices": 4, "island_size": 4, "metaops": [op("t/a", 2, {1: 4.0, 2: 2.0})]}
    with pytest.raises(ValueError, match=match):
        simulate(problem, plan_of(slices))


def test_bad_arguments_raise():
    problem = {"num_devices": 2, "island_size": 2, "metaops": [op("t/a", 1, {1: 1.0})]}
    with pytest.raises(TypeError, match="plan"):
        simulate(problem, [])
    with pytest.raises(TypeError, match="cluster"):
        simulate(problem, plan_of([sl("t/a", 0, 1, [0])]), cluster={"devices_per_node": 2})
    with pytest.raises(ValueError, match="inter_gbps"):
        Cluster(inter_gbps=0.0)
    for bad in (0, 2.0, True):  # a bool is not a count
        with pytest.raises(ValueError, match=f"devices_per_node must be a positive int, got {bad!r}"):
            Cluster(devices_per_node=bad)


@pytest.mark.parametrize("seed", range(12))
def test_planner_plans_scale_with_bandwidth(seed):
    """Metamorphic checks on real plans of random problems: doubling every bandwidth (no
    latency) halves all communication; compute never exceeds the plan's makespan."""
    from scheduler.planner import plan_problem
    from scheduler.random_problem import random_problem

    problem = random_problem(seed, 10 + seed, 16, island_size=4)
    plan = plan_problem(problem, method="spindle")
    cl = Cluster(devices_per_node=4, intra_latency_us=0.0, inter_latency_us=0.0)
    sim = simulate(problem, plan, cl)
    assert 0 < sim.compute_ms <= plan["makespan_ms"] * (1 + 1e-9)

    fast = simulate(problem, plan, Cluster(devices_per_node=4, intra_gbps=300.0, inter_gbps=90.0,
                                           intra_latency_us=0.0, inter_latency_us=0.0))
    assert fast.transfer_ms == pytest.approx(sim.transfer_ms / 2, rel=1e-12)
    assert fast.sync_ms == pytest.approx(sim.sync_ms / 2, rel=1e-12)
    assert fast.compute_ms == sim.compute_ms
