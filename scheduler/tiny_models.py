"""Built-in trainable models, small enough to train on a CPU in seconds.

- ``tiny-clip``: three encoders (vision, audio, text) and a shared contrastive head; three
  tasks, one per pair of modalities (ImageBind-like Multitask-CLIP in miniature).
- ``tiny-val``: vision and audio encoders feeding a small decoder-only LM whose input is a
  packed multi-modal batch (``mtmm_kernels.pack_multimodal``, no padding) and per-task output
  heads applied in one grouped GEMM (``mtmm_kernels.GroupedLinear``); tasks VL, AL, VAL.

``get_trainable_model(name)`` returns a fresh, unbuilt :class:`MultiTaskModel` (call
``build()``); its ``synthetic`` attribute makes a batch of a task from a ``torch.Generator``
(see ``scheduler.data``). Learnable structure is planted in the synthetic data (the modalities
of a sample share a latent code), so the losses go down.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scheduler.modelapi import Component, MultiTaskModel, Task
from scheduler.user_code import is_spec, load_callable

DEFAULT_MODEL = "tiny-clip"


# --- layers -------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-LN transformer layer on padded [B, T, H]; ``ctx["mask"]`` [B, T] bool marks real
    tokens (None: all real)."""

    def __init__(self, hidden: int, heads: int, mlp: int | None = None):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        # No qkv bias: the key bias has an exactly zero gradient, which Adam would turn into noise.
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden, bias=False), nn.Linear(hidden, hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, mlp or 4 * hidden), nn.Linear(mlp or 4 * hidden, hidden)

    def attend(self, x_BTH: torch.Tensor, attn_mask) -> torch.Tensor:
        b, t, h = x_BTH.shape
        q, k, v = self.qkv(self.ln1(x_BTH)).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(o.transpose(1, 2).reshape(b, t, h))

    def forward(self, x_BTH: torch.Tensor, ctx) -> torch.Tensor:
        mask = None if ctx is None or ctx.get("mask") is None else ctx["mask"][:, None, None, :]
        x_BTH = x_BTH + self.attend(x_BTH, mask)
        return x_BTH + self.fc2(F.gelu(self.fc1(self.ln2(x_BTH))))


class VarlenBlock(Block):
    """The same layer on a packed [T, H] buffer: causal attention inside each sequence only
    (``ctx["attn_mask"]`` [T, T] bool, built from cu_seqlens)."""

    def forward(self, x_TH: torch.Tensor, ctx) -> torch.Tensor:
        x_TH = x_TH + self.attend(x_TH[None], ctx["attn_mask"][None, None])[0]
        return x_TH + self.fc2(F.gelu(self.fc1(self.ln2(x_TH))))


class Embed(nn.Module):
    """Raw modality -> [B, T, H]: a linear patch/frame embedding or a token embedding, plus
    learned positions."""

    def __init__(self, key: str, hidden: int, max_len: int, in_dim: int | None = None, vocab: int | None = None):
        super().__init__()
        self.key = key
        self.inp = nn.Embedding(vocab, hidden) if vocab else nn.Linear(in_dim, hidden)
        self.pos = nn.Parameter(torch.randn(max_len, hidden) * 0.02)

    def forward(self, inputs, batch, ctx) -> torch.Tensor:
        x = self.inp(batch[self.key])
        return x + self.pos[: x.shape[1]]


class Pool(nn.Module):
    """[B, T, H] -> [B, H]: mean over real tokens, then LayerNorm."""

    def __init__(self, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(hidden)

    def forward(self, x_BTH: torch.Tensor, ctx) -> torch.Tensor:
        mask = None if ctx is None else ctx.get("mask")
        if mask is None:
            return self.ln(x_BTH.mean(1))
        m = mask.to(x_BTH.dtype)[..., None]
        return self.ln((x_BTH * m).sum(1) / m.sum(1))


class ContrastPre(nn.Module):
    """{encoder: [B, H_e]} -> [B, 2, D]: each encoder's own projection, inputs in name order."""

    def __init__(self, dims: dict[str, int], out: int):
        super().__init__()
        self.proj = nn.ModuleDict({k: nn.Linear(h, out, bias=False) for k, h in dims.items()})

    def forward(self, inputs, batch, ctx) -> torch.Tensor:
        if len(inputs) != 2:
            raise ValueError(f"contrastive head: expected two encoders, got {sorted(inputs)}")
        return torch.stack([self.proj[k](inputs[k]) for k in sorted(inputs)], 1)


class ContrastLayer(nn.Module):
    """[B, 2, D] -> [B, B] logits of the pairing, with a learned temperature."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(5.0)))

    def forward(self, z_B2D: torch.Tensor, ctx) -> torch.Tensor:
        z = F.normalize(z_B2D, dim=-1)
        return self.logit_scale.exp() * z[:, 0] @ z[:, 1].T


def clip_loss(outputs, batch) -> torch.Tensor:
    """Symmetric InfoNCE, summed over the batch (divided by the batch size by the caller)."""
    (logits_BB,) = outputs.values()
    target = torch.arange(logits_BB.shape[0], device=logits_BB.device)
    rows = F.cross_entropy(logits_BB, target, reduction="sum")
    cols = F.cross_entropy(logits_BB.T, target, reduction="sum")
    return 0.5 * (rows + cols)


# --- tiny-clip ------------------------------------------------------------------------------
CLIP_SHAPES = {"vision": (9, 12), "audio": (12, 8)}  # (tokens, features) per sample
CLIP_VOCAB, CLIP_TEXT_LEN = 48, (3, 10)


def _text_mask(task, batch):
    if "text_len" not in batch:
        return {"mask": None}
    t = batch["text"].shape[1]
    return {"mask": torch.arange(t, device=batch["text"].device)[None, :] < batch["text_len"][:, None]}


def tiny_clip(layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0) -> MultiTaskModel:
    enc = {"vision": hidden, "audio": hidden * 3 // 4, "text": hidden}

    def encoder(name, **embed):
        h = enc[name]
        return Component(
            name,
            layer=lambda i: Block(h, heads),
            num_layers=layers,
            pre=lambda: Embed(name, h, max_len=16, **embed),
            post=lambda: Pool(h),
            context=_text_mask if name == "text" else None,
            hidden=h,
            heads=heads,
        )

    components = [
        encoder("vision", in_dim=CLIP_SHAPES["vision"][1]),
        encoder("audio", in_dim=CLIP_SHAPES["audio"][1]),
        encoder("text", vocab=CLIP_VOCAB),
        Component(
            "contrast",
            layer=lambda i: ContrastLayer(),
            num_layers=1,
            pre=lambda: ContrastPre(enc, 16),
            hidden=16,
            kind="loss",
            splittable=False,  # every pair of the batch is a negative: the layer needs it whole
        ),
    ]
    mods = {
        "vision": {"vision": (CLIP_SHAPES["vision"], "float")},
        "audio": {"audio": (CLIP_SHAPES["audio"], "float")},
        "text": {"text": ((None,), "int"), "text_len": ((), "int")},
    }
    lens = {"vision": CLIP_SHAPES["vision"][0], "audio": CLIP_SHAPES["audio"][0], "text": 7, "contrast": 1}
    tasks = []
    for (a, b), batch in zip([("vision", "text"), ("audio", "text"), ("vision", "audio")], (8, 6, 4)):
        tasks.append(
            Task(
                name=f"{a}-{b}",
                batch=batch,
                flows=((a, "contrast"), (b, "contrast")),
                modalities={**mods[a], **mods[b]},
                loss=clip_loss,
                seq_lens={a: lens[a], b: lens[b], "contrast": 1},
            )
        )
    model = MultiTaskModel("tiny-clip", components, tasks, seed=seed)
    model.synthetic = _clip_synthetic(model)
    return model


def _latent_tokens(z_BZ: torch.Tensor, length: int, vocab: int, gen) -> torch.Tensor:
    """Token j spells latent coordinate j % Z quantised to 8 bins (token = 8 * (j % Z) + bin):
    the text says what the other modalities show, and the next token is predictable from them."""
    z = z_BZ.shape[1]
    assert vocab >= 8 * z
    bins = torch.bucketize(z_BZ, torch.tensor([-1.15, -0.67, -0.32, 0.0, 0.32, 0.67, 1.15]))
    coord = torch.arange(length) % z
    return 8 * coord[None, :] + bins[:, coord]


def _mix(z_BZ: torch.Tensor, tokens: int, feat: int, key: str, gen) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, key)))  # the same mixing on every call
    w = torch.randn(z_BZ.shape[1], tokens * feat, generator=g)
    return (z_BZ @ w).view(-1, tokens, feat) + 0.5 * torch.randn(z_BZ.shape[0], tokens, feat, generator=gen)


def _clip_synthetic(model: MultiTaskModel) -> Callable:
    def make(task: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
        t = model.tasks[task]
        z = torch.randn(t.batch, 4, generator=gen)
        out = {}
        for key in t.modalities:
            if key in CLIP_SHAPES:
                out[key] = _mix(z, *CLIP_SHAPES[key], key, gen)
        if "text" in t.modalities:
            lo, hi = CLIP_TEXT_LEN
            lens = torch.randint(lo, hi + 1, (t.batch,), generator=gen)
            length = int(lens.max())
            text = _latent_tokens(z, length, CLIP_VOCAB, gen)
            out["text"] = torch.where(torch.arange(length)[None] < lens[:, None], text, 0)
            out["text_len"] = lens
        return out

    return make


# --- tiny-val -------------------------------------------------------------------------------
VAL_SHAPES = {"vision": (8, 12), "audio": (12, 8)}
VAL_OUT_TOKENS = {"vision": 4, "audio": 3}  # tokens each encoder hands the LM per sample
VAL_VOCAB, VAL_TEXT_LEN = 40, (4, 12)
VAL_TASKS = {"vl": ("vision",), "al": ("audio",), "val": ("vision", "audio")}


class Resample(nn.Module):
    """[B, T, H] -> [B, k, H]: average over k equal groups of tokens, projection, LayerNorm."""

    def __init__(self, hidden: int, k: int):
        super().__init__()
        self.k, self.proj, self.ln = k, nn.Linear(hidden, hidden), nn.LayerNorm(hidden)

    def forward(self, x_BTH: torch.Tensor, ctx) -> torch.Tensor:
        b, t, h = x_BTH.shape
        return self.ln(self.proj(x_BTH.view(b, self.k, t // self.k, h).mean(2)))


def _val_prefix(task: str) -> list[str]:
    return list(VAL_TASKS[task])


def _val_rows(task, batch) -> list[int]:
    prefix = sum(VAL_OUT_TOKENS[m] for m in _val_prefix(task))
    return (batch["text_len"] + prefix).tolist()


def _val_context(task, batch) -> dict:
    """cu_seqlens and the block-diagonal causal mask of the packed shard."""
    rows = torch.tensor(_val_rows(task, batch), dtype=torch.int64)
    seq_ids = torch.repeat_interleave(torch.arange(len(rows)), rows)
    cu = torch.zeros(len(rows) + 1, dtype=torch.int64)
    cu[1:] = rows.cumsum(0)
    pos = torch.arange(int(cu[-1])) - cu[seq_ids]
    same = seq_ids[:, None] == seq_ids[None, :]
    causal = pos[:, None] >= pos[None, :]
    dev = batch["text"].device
    return {
        "attn_mask": (same & causal).to(dev),
        "cu_seqlens": cu.to(dev),
        "position_ids": pos.to(dev),
        "task_index": list(VAL_TASKS).index(task),
        "prefix": sum(VAL_OUT_TOKENS[m] for m in _val_prefix(task)),
    }


class LMInput(nn.Module):
    """Encoder outputs plus embedded text -> one packed multi-modal buffer [T, H] (each
    sample: its vision tokens, audio tokens, text tokens; no padding) plus positions."""

    def __init__(self, hidden: int, max_len: int = 32):
        super().__init__()
        self.tok = nn.Embedding(VAL_VOCAB, hidden)
        self.pos = nn.Embedding(max_len, hidden)

    def forward(self, inputs, batch, ctx) -> torch.Tensor:
        from mtmm_kernels import pack_multimodal

        b = batch["text"].shape[0]
        streams, lengths = [], []
        for m in ("vision", "audio"):
            if m in inputs:
                streams.append(inputs[m])
                lengths.append(torch.full((b,), inputs[m].shape[1], dtype=torch.int32))
        streams.append(self.tok(batch["text"]))
        lengths.append(batch["text_len"].to(torch.int32).cpu())
        packed = pack_multimodal(streams, lengths)
        return packed.values + self.pos(ctx["position_ids"])


class Head(nn.Module):
    """Per-task output heads as ONE grouped GEMM: group g holds task g's weights; a shard of
    one task puts all its rows in its group (the others are empty)."""

    def __init__(self, hidden: int, groups: int):
        super().__init__()
        from mtmm_kernels import GroupedLinear

        self.ln = nn.LayerNorm(hidden)
        self.lin = GroupedLinear(groups, hidden, VAL_VOCAB)
        self.groups = groups

    def forward(self, x_TH: torch.Tensor, ctx) -> torch.Tensor:
        g = ctx["task_index"]
        t = x_TH.shape[0]
        offsets = torch.tensor([0] * g + [t] * (self.groups - g), dtype=torch.int32, device=x_TH.device)
        return self.lin(self.ln(x_TH), offsets=offsets)


def val_loss(outputs, batch) -> torch.Tensor:
    """Next-token cross-entropy on the text part of each packed sequence, summed."""
    (logits_TV,) = outputs.values()
    lens = batch["text_len"].cpu()
    prefix = sum(k for m, k in VAL_OUT_TOKENS.items() if m in batch)  # encoder tokens before the text
    rows = lens + prefix
    starts = torch.cumsum(rows, 0) - rows + prefix
    idx = torch.cat([s + torch.arange(int(n) - 1) for s, n in zip(starts.tolist(), lens.tolist())])
    tgt = torch.cat([batch["text"][i, 1 : int(n)].cpu() for i, n in enumerate(lens.tolist())])
    return F.cross_entropy(logits_TV[idx.to(logits_TV.device)], tgt.to(logits_TV.device), reduction="sum")


def val_units(batch) -> int:
    return int((batch["text_len"] - 1).sum())


def tiny_val(layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0) -> MultiTaskModel:
    def encoder(name):
        return Component(
            name,
            layer=lambda i: Block(hidden, heads),
            num_layers=layers,
            pre=lambda: Embed(name, hidden, max_len=16, in_dim=VAL_SHAPES[name][1]),
            post=lambda: Resample(hidden, VAL_OUT_TOKENS[name]),
            hidden=hidden,
            heads=heads,
        )

    components = [
        encoder("vision"),
        encoder("audio"),
        Component(
            "lm",
            layer=lambda i: VarlenBlock(hidden, heads),
            num_layers=layers + 1,
            pre=lambda: LMInput(hidden),
            context=_val_context,
            rows=_val_rows,
            hidden=hidden,
            heads=heads,
        ),
        Component(
            "head",
            layer=lambda i: Head(hidden, len(VAL_TASKS)),
            num_layers=1,
            context=_val_context,
            rows=_val_rows,
            hidden=hidden,
            kind="linear",
        ),
    ]
    tasks = []
    for (name, mods), batch in zip(VAL_TASKS.items(), (6, 6, 4)):
        modalities = {m: (VAL_SHAPES[m], "float") for m in mods}
        modalities.update({"text": ((None,), "int"), "text_len": ((), "int")})
        prefix = sum(VAL_OUT_TOKENS[m] for m in mods)
        tasks.append(
            Task(
                name=name,
                batch=batch,
                flows=tuple((m, "lm") for m in mods) + (("lm", "head"),),
                modalities=modalities,
                loss=val_loss,
                units=val_units,
                seq_lens={**{m: VAL_SHAPES[m][0] for m in mods}, "lm": prefix + 8, "head": prefix + 8},
            )
        )
    model = MultiTaskModel("tiny-val", components, tasks, seed=seed)
    model.synthetic = _val_synthetic(model)
    return model


def _val_synthetic(model: MultiTaskModel) -> Callable:
    def make(task: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
        t = model.tasks[task]
        z = torch.randn(t.batch, 4, generator=gen)
        out = {m: _mix(z, *VAL_SHAPES[m], m, gen) for m in VAL_TASKS[task]}
        lo, hi = VAL_TEXT_LEN
        lens = torch.randint(lo, hi + 1, (t.batch,), generator=gen)
        length = int(lens.max())
        text = _latent_tokens(z, length, VAL_VOCAB, gen)
        out["text"] = torch.where(torch.arange(length)[None] < lens[:, None], text, 0)
        out["text_len"] = lens
        return out

    return make


# --- registry -------------------------------------------------------------------------------
MODELS: dict[str, Callable[..., MultiTaskModel]] = {"tiny-clip": tiny_clip, "tiny-val": tiny_val}


def get_trainable_model(name: str = DEFAULT_MODEL, **options) -> MultiTaskModel:
    """A fresh (unbuilt) model: a built-in one, or a user's ``package.module:factory`` (a
    callable returning an unbuilt ``MultiTaskModel``, called on every rank); ``options`` go to
    its constructor (layers, hidden...)."""
    if is_spec(name):
        model = load_callable(name, "model")(**options)
        if not isinstance(model, MultiTaskModel):
            raise TypeError(f"model: {name!r} returned a {type(model).__name__}, "
                            "not a MultiTaskModel")
        return model
    if name not in MODELS:
        raise ValueError(f"name: unknown trainable model {name!r}; choose from {sorted(MODELS)} "
                         "or give 'package.module:factory'")
    return MODELS[name](**options)
