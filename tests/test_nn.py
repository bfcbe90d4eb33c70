"""GroupedLinear: initialisation, both routing modes against per-group nn.functional.linear."""

from __future__ import annotations

import math

import pytest
import torch

from mtmm_kernels import GroupedLinear, grouped_gemm


@pytest.fixture(autouse=True)
def _single_config(monkeypatch):
    monkeypatch.setattr(grouped_gemm, "AUTOTUNE", False)  # keep the GPU run short


def rel_err(out, expected):
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


def per_group_linear(module, x, group_of_row):
    """Each row through its group's slice as an nn.functional.linear, in float64."""
    w64 = module.weight.detach().double()
    b64 = module.bias.detach().double() if module.bias is not None else None
    rows = []
    for t in range(x.shape[0]):
        g = int(group_of_row[t])
        bias = None if b64 is None else b64[g]
        rows.append(torch.nn.functional.linear(x[t].double(), w64[g].t(), bias))
    return torch.stack(rows)


def test_parameters_and_init():
    m = GroupedLinear(4, 256, 48)
    assert m.weight.shape == (4, 256, 48) and m.bias.shape == (4, 48)
    assert {n for n, _ in m.named_parameters()} == {"weight", "bias"}
    bound = 1 / math.sqrt(256)
    for p in (m.weight, m.bias):
        assert p.abs().max() <= bound
        # U(-b, b) has std b / sqrt(3); 4 * 256 * 48 samples pin it to about 1%.
    assert abs(m.weight.std().item() - bound / math.sqrt(3)) < 0.03 * bound
    # every group is drawn independently, like G separate nn.Linear layers
    assert not torch.equal(m.weight[0], m.weight[1])
    assert "num_groups=4, in_features=256, out_features=48, bias=True" in repr(m)


def test_factory_kwargs_and_no_bias():
    m = GroupedLinear(2, 3, 5, bias=False, dtype=torch.float16, device="cpu")
    assert m.bias is None and m.weight.dtype == torch.float16
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    assert GroupedLinear(0, 0, 3).weight.shape == (0, 0, 3)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_with_offsets(device, bias):
    m = GroupedLinear(3, 11, 7, bias=bias, device=device)
    sizes = [4, 0, 9]
    x = torch.randn(15, 11, device=device)  # two rows past the last group
    offsets = torch.tensor(sizes, device=device).cumsum(0)
    group_of_row = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    y = m(x, offsets=offsets)
    assert rel_err(y[:13], per_group_linear(m, x[:13], group_of_row)) < 1e-5
    assert torch.equal(y[13:], torch.zeros_like(y[13:]))
    y.square().sum().backward()
    assert m.weight.grad.shape == m.weight.shape
    assert torch.equal(m.weight.grad[1], torch.zeros_like(m.weight.grad[1]))


def test_forward_with_group_ids(device):
    m = GroupedLinear(4, 6, 5, device=device)
    ids = torch.tensor([3, 0, 3, 1, 1, 0, 3, 2, 0], device=device)
    x = torch.randn(9, 6, device=device, requires_grad=True)
    y = m(x, group_ids=ids)
    assert rel_err(y, per_group_linear(m, x.detach(), ids.cpu())) < 1e-5
    y.sum().backward()
    assert x.grad.shape == x.shape and m.bias.grad.shape == m.bias.shape
    # dBias[g] is the number of rows of group g times the all-ones upstream gradient
    counts = torch.bincount(ids.cpu(), minlength=4).float()
    assert torch.equal(m.bias.grad.cpu(), counts[:, None].expand(4, 5))


def test_routing_arguments():
    m = GroupedLinear(2, 3, 4)
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="exactly one of offsets or group_ids"):
        m(x)
    with pytest.raises(ValueError, match="exactly one of offsets or group_ids"):
        m(x, offsets=torch.tensor([2, 5]), group_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="^x"):
        m(torch.randn(5, 4), offsets=torch.tensor([2, 5]))
    with pytest.raises(ValueError, match="^x"):
        m(torch.tensor(1.0), offsets=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="^x"):
        m(x.numpy(), offsets=torch.tensor([2, 5]))
    with pytest.raises(ValueError, match="^group_ids"):
        m(x.view(1, 5, 3), group_ids=torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("routing", ["offsets", "group_ids"])
def test_leading_dims_like_linear(device, routing):
    """x [..., in] gives [..., out], as for nn.Linear: rows are the leading dims flattened in
    order; group_ids have x's leading shape (a task or modality per token), offsets count the
    flattened rows. Gradients come back in x's shape."""
    m = GroupedLinear(3, 6, 5, device=device)
    x = torch.randn(2, 7, 6, device=device)[:, 1:]  # [2, 6, 6], not contiguous
    ids = torch.tensor([[2, 0, 2, 1, 0, 0], [1, 1, 2, 0, 2, 2]], device=device)
    if routing == "offsets":
        kwargs = flat = {"offsets": torch.tensor([4, 4, 11], device=device)}
    else:
        kwargs, flat = {"group_ids": ids}, {"group_ids": ids.reshape(-1)}
    xl = x.detach().requires_grad_()
    y = m(xl, **kwargs)
    assert y.shape == (2, 6, 5)
    expected = m(x.reshape(12, 6), **flat)
    assert torch.equal(y.reshape(12, 5), expected)
    y.square().sum().backward()
    assert xl.grad.shape == x.shape
    one = m(x[0, 0], **({"offsets": torch.tensor([1, 1, 1], device=device)}
                        if routing == "offsets" else {"group_ids": ids[0, 0]}))
    assert one.shape == (5,) and rel_err(one, expected[0]) < 1e-5  # T = 1: maybe another tile
    empty = GroupedLinear(2, 0, 3, device=device)
    out = empty(torch.randn(2, 3, 0, device=device),
                **({"offsets": torch.tensor([2, 6], device=device)} if routing == "offsets"
                   else {"group_ids": torch.zeros(2, 3, dtype=torch.long, device=device)}))
    assert out.shape == (2, 3, 3)


@pytest.mark.parametrize("bias", [True, False])
def test_from_and_to_linears(device, bias):
    """Per-task nn.Linear heads into one GroupedLinear and back: group g computes what
    linears[g] computes, row by row, and the round trip gives the same parameters."""
    torch.manual_seed(0)
    heads = [torch.nn.Linear(11, 7, bias=bias, device=device) for _ in range(3)]
    m = GroupedLinear.from_linears(heads)
    assert (m.num_groups, m.in_features, m.out_features) == (3, 11, 7)
    assert (m.bias is not None) == bias and m.weight.device.type == device.type
    ids = torch.tensor([2, 0, 2, 1, 1, 0, 2], device=device)
    x = torch.randn(7, 11, device=device)
    y = m(x, group_ids=ids)
    with torch.no_grad():
        expected = torch.stack([heads[int(g)](x[t]) for t, g in enumerate(ids.tolist())])
    assert rel_err(y, expected) < 1e-5
    back = m.to_linears()
    assert len(back) == 3
    for a, b in zip(heads, back):
        assert torch.equal(a.weight, b.weight)
        assert (a.bias is None and b.bias is None) or torch.equal(a.bias, b.bias)
    # copies: training the grouped module leaves the heads alone
    with torch.no_grad():
        m.weight.add_(1.0)
    assert not torch.equal(m.to_linears()[0].weight, heads[0].weight)


@pytest.mark.parametrize("routing", ["offsets", "group_ids"])
def test_float64_module_computes_like_float64_linears(device, routing):
    """module.double() (a gradcheck, a float64 reference run) computes what float64 nn.Linear
    heads compute, forward and backward, to float64 rounding."""
    torch.manual_seed(0)
    heads = [torch.nn.Linear(5, 4, device=device) for _ in range(3)]
    m = GroupedLinear.from_linears(heads).double()
    heads = [h.double() for h in heads]
    assert m.weight.dtype == torch.float64
    ids = torch.tensor([1, 1, 0, 2, 2, 2, 0], device=device)
    x = torch.randn(7, 5, device=device, dtype=torch.float64)
    if routing == "offsets":
        ids = ids.sort().values
        y = m(x, offsets=torch.tensor([2, 4, 7], device=device))
    else:
        y = m(x, group_ids=ids)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    expected = torch.stack([heads[int(g)](x[t]) for t, g in enumerate(ids.tolist())])
    (expected * dy).sum().backward()
    assert rel_err(y, expected) < 1e-12
    for g, head in enumerate(heads):
        assert rel_err(m.weight.grad[g], head.weight.grad.t()) < 1e-12
        assert rel_err(m.bias.grad[g], head.bias.grad) < 1e-12


def test_gradient_penalty_like_linears(device):
    """A gradient penalty (the squared norm of the loss's gradient w.r.t. the input, as in
    WGAN-GP or R1) through a GroupedLinear trains its parameters as it trains the per-task
    nn.Linear heads it came from (those in float64)."""
    torch.manual_seed(0)
    heads = [torch.nn.Linear(11, 7, device=device) for _ in range(3)]
    m = GroupedLinear.from_linears(heads)
    heads = [h.double() for h in heads]
    ids = torch.tensor([2, 0, 2, 1, 1, 0, 2, 2], device=device)
    x = torch.randn(8, 11, device=device)

    def penalty(out, x):
        (dx,) = torch.autograd.grad(out.tanh().sum(), x, create_graph=True)
        return dx.square().sum()

    xg = x.clone().requires_grad_()
    penalty(m(xg, group_ids=ids), xg).backward()
    x64 = x.double().requires_grad_()
    rows = [heads[int(g)](x64[t]) for t, g in enumerate(ids.tolist())]
    penalty(torch.stack(rows), x64).backward()
    for g, head in enumerate(heads):
        assert rel_err(m.weight.grad[g], head.weight.grad.t()) < 1e-5
        assert rel_err(m.bias.grad[g], head.bias.grad) < 1e-5
    assert rel_err(xg.grad, x64.grad) < 1e-5


def test_flop_counter_attributes_flops_to_the_module(device):
    """FlopCounterMode (how trainers compute MFU) counts a GroupedLinear's forward and backward
    under the module, as many FLOPs as for the per-task nn.Linear heads it came from."""
    from torch.utils.flop_counter import FlopCounterMode
    heads = torch.nn.ModuleList(torch.nn.Linear(11, 7, device=device) for _ in range(3))
    m = GroupedLinear.from_linears(heads)
    ids = torch.tensor([2, 0, 2, 1, 1, 0, 2, 2], device=device)
    x = torch.randn(8, 11, device=device, requires_grad=True)  # dX counts too
    with FlopCounterMode(display=False) as grouped:
        m(x, group_ids=ids).square().sum().backward()
    with FlopCounterMode(display=False) as loop:
        torch.cat([heads[int(g)](x[t:t + 1]) for t, g in enumerate(ids.tolist())]
                  ).square().sum().backward()
    assert grouped.get_total_flops() == loop.get_total_flops() == 3 * 2 * 8 * 11 * 7
    assert sum(grouped.get_flop_counts()["GroupedLinear"].values()) == 3 * 2 * 8 * 11 * 7


def test_selective_checkpointing_policy_sees_the_op(device, monkeypatch):
    """Under selective activation checkpointing (a dispatch mode) the forward is the op
    mtmm.grouped_mm, so a policy can save its output: the backward then recomputes nothing of
    it (one forward launch, one dX launch), with the gradients of an unchecked run."""
    import functools

    from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                        create_selective_checkpoint_contexts)
    launches = []
    impl = grouped_gemm._grouped_mm_impl
    monkeypatch.setattr(grouped_gemm, "_grouped_mm_impl",
                        lambda *args: launches.append(1) or impl(*args))
    m = GroupedLinear(3, 5, 4, device=device)
    ids = torch.tensor([0, 2, 1, 1, 2, 0, 0], device=device)
    x = torch.randn(7, 5, device=device, requires_grad=True)

    def save_grouped_mm(ctx, op, *args, **kwargs):
        return (CheckpointPolicy.MUST_SAVE if op == torch.ops.mtmm.grouped_mm.default
                else CheckpointPolicy.PREFER_RECOMPUTE)

    def fn(x):
        return m(x, group_ids=ids).tanh()

    context = functools.partial(create_selective_checkpoint_contexts, save_grouped_mm)
    checkpoint(fn, x, use_reentrant=False, context_fn=context).sum().backward()
    assert len(launches) == 2
    grads = [t.grad.clone() for t in (x, m.weight, m.bias)]
    for t in (x, m.weight, m.bias):
        t.grad = None
    fn(x).sum().backward()
    for g, t in zip(grads, (x, m.weight, m.bias)):
        assert torch.equal(g, t.grad)


def test_from_linears_refuses_mismatched_heads():
    lin = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="at least one"):
        GroupedLinear.from_linears([])
    with pytest.raises(TypeError, match=r"^linears\[1\]"):
        GroupedLinear.from_linears([lin, torch.nn.Conv1d(4, 3, 1)])
    with pytest.raises(ValueError, match=r"^linears\[1\] is 4 -> 5"):
        GroupedLinear.from_linears([lin, torch.nn.Linear(4, 5)])
    with pytest.raises(ValueError, match=r"^linears\[1\] has no bias"):
        GroupedLinear.from_linears([lin, torch.nn.Linear(4, 3, bias=False)])
    with pytest.raises(ValueError, match=r"^linears\[1\] is torch.float16"):
        GroupedLinear.from_linears([lin, torch.nn.Linear(4, 3, dtype=torch.float16)])


@pytest.mark.parametrize("args,exc,name", [
    ((-1, 3, 4), ValueError, "num_groups"),
    ((2, 3.0, 4), TypeError, "in_features"),
    ((2, 3, -4), ValueError, "out_features"),
])
def test_bad_constructor_arguments(args, exc, name):
    with pytest.raises(exc, match=f"^{name}"):
        GroupedLinear(*args)


def _route(routing: str, device) -> dict:
    if routing == "offsets":
        return {"offsets": torch.tensor([5, 5, 14], device=device)}  # 3 rows past the groups
    return {"group_ids": torch.tensor([2, 0, 2, 1, 1, 0, 2, 2, 0, 1, 0, 2, 1, 1, 0, 0, 2],
                                      device=device)}


@pytest.mark.parametrize("routing", ["offsets", "group_ids"])
def test_autocast_computes_like_linear(device, routing):
    """Inside torch.autocast a GroupedLinear computes in the region's dtype, as nn.Linear does:
    the same bits as the module cast to that dtype by hand, the hand-cast gradients (in fp32)
    for its fp32 parameters, and fp16 activations (an autocast layer's output) taken next to
    its fp32 weights. fp16: the interpreter's bf16 dot is wrong."""
    torch.manual_seed(0)
    m = GroupedLinear(3, 24, 40, device=device)
    half = GroupedLinear(3, 24, 40, dtype=torch.float16, device=device)
    half.load_state_dict(m.state_dict())  # the fp32 values rounded, as autocast rounds them
    x, route = torch.randn(17, 24, device=device), _route(routing, device)
    expected = half(x.half(), **route)
    with torch.autocast(device.type, dtype=torch.float16):
        y = m(x, **route)
        y_from_half = m(x.half(), **route)
        linear_dtype = torch.nn.Linear(24, 40, device=device)(x).dtype
        with torch.autocast(device.type, enabled=False):
            y_off = m(x, **route)
    assert y.dtype == linear_dtype == torch.float16 and y_off.dtype == torch.float32
    assert torch.equal(y, expected) and torch.equal(y_from_half, expected)
    y.float().square().sum().backward()
    expected.float().square().sum().backward()
    assert m.weight.grad.dtype == m.bias.grad.dtype == torch.float32
    assert torch.equal(m.weight.grad, half.weight.grad.float())
    assert torch.equal(m.bias.grad, half.bias.grad.float())
    with pytest.raises(TypeError, match="^w"):  # outside autocast a dtype mix stays an error
        m(x.half(), **route)


@pytest.mark.parametrize("routing", ["offsets", "group_ids"])
def test_compile_traces_autocast_cpu(routing):
    """torch.compile (fullgraph, aot_eager) over a GroupedLinear in an autocast region traces
    the cast and gives eager's result."""
    torch.manual_seed(0)
    m = GroupedLinear(3, 6, 5)
    x, route = torch.randn(17, 6), _route(routing, "cpu")

    def step(x):
        with torch.autocast("cpu", dtype=torch.float16):
            return m(x, **route)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    assert compiled.dtype == torch.float16 and torch.equal(compiled, step(x))


@pytest.mark.parametrize("routing", ["offsets", "group_ids"])
def test_compile_traces_grouped_linear_cpu(routing):
    """fullgraph tracing of a GroupedLinear, forward and backward, on the CPU (aot_eager: no
    code generation). The group sort behind group_ids must be an op too: its device checks
    and launcher are not traceable."""
    torch.manual_seed(0)
    m = GroupedLinear(3, 6, 5)
    x = torch.randn(11, 6)
    if routing == "offsets":
        route = {"offsets": torch.tensor([4, 4, 10])}
    else:
        route = {"group_ids": torch.tensor([2, 0, 2, 1, 1, 0, 2, 2, 0, 1, 0])}

    def step(x):
        return m(x, **route).square().sum()

    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.compile(step, fullgraph=True, backend="aot_eager")(xc).backward()
    wc, bc = m.weight.grad.clone(), m.bias.grad.clone()
    m.zero_grad()
    step(xe).backward()
    assert rel_err(xc.grad, xe.grad) < 1e-5
    assert rel_err(wc, m.weight.grad) < 1e-5 and rel_err(bc, m.bias.grad) < 1e-5


@pytest.mark.parametrize("routing", ["offsets", "group_ids", "group_ids_3d"])
def test_compile_dynamic_rows_trace_once(routing):
    """A multi-task batch has a new row count every step: with dynamic shapes one trace serves
    them all (the checks and fake implementations guard no row count), and each step's
    gradients equal eager's."""
    import torch._dynamo.testing

    torch.manual_seed(0)
    m = GroupedLinear(3, 6, 5)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def step(x, route):
        return m(x, **route).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend=counter, dynamic=True)
    for T in (11, 17, 23):
        if routing == "offsets":
            x, route = torch.randn(T, 6), {"offsets": torch.tensor([2, 2, T - 1])}
        elif routing == "group_ids":
            x, route = torch.randn(T, 6), {"group_ids": torch.randint(0, 3, (T,))}
        else:
            x, route = torch.randn(2, T, 6), {"group_ids": torch.randint(0, 3, (2, T))}
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        compiled(xc, route).backward()
        wc, bc = m.weight.grad.clone(), m.bias.grad.clone()
        m.zero_grad()
        step(xe, route).backward()
        assert rel_err(xc.grad, xe.grad) < 1e-5, T
        assert rel_err(wc, m.weight.grad) < 1e-5 and rel_err(bc, m.bias.grad) < 1e-5, T
        m.zero_grad()
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.parametrize("routing", ["offsets", "group_ids"])
def test_compile_fullgraph_grouped_linear(routing):
    """torch.compile(fullgraph=True) over a GroupedLinear, forward and backward, in bf16."""
    torch.manual_seed(0)
    eager = GroupedLinear(5, 256, 192, dtype=torch.bfloat16, device="cuda")
    compiled_module = GroupedLinear(5, 256, 192, dtype=torch.bfloat16, device="cuda")
    compiled_module.load_state_dict(eager.state_dict())
    x = torch.randn(900, 256, dtype=torch.bfloat16, device="cuda")
    if routing == "offsets":
        offsets = torch.tensor([100, 100, 450, 460, 890], device="cuda", dtype=torch.int32)
        route = {"offsets": offsets}
    else:
        route = {"group_ids": torch.randint(0, 5, (900,), device="cuda")}

    def step(module, x):
        return module(x, **route).float().square().mean()

    compiled = torch.compile(step, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    step(eager, xe).backward()
    loss = compiled(compiled_module, xc)
    loss.backward()
    assert rel_err(xc.grad, xe.grad) < 1e-2
    assert rel_err(compiled_module.weight.grad, eager.weight.grad) < 1e-2
    assert rel_err(compiled_module.bias.grad, eager.bias.grad) < 1e-2
