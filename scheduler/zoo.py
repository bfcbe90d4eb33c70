"""The paper's three models at full size, as planner problems (docs/models.md).

Architectures follow the paper and the models it names (DESIGN.md); the per-task batch sizes
and the text lengths are NOT published, so the ones here are our choices, explained in
docs/models.md. Every batch is a multiple of 64 so that data parallelism admits every
power-of-two device count up to 64.
"""

from __future__ import annotations

from collections.abc import Sequence

from .graph import Component, ModelSpec, Task, to_problem

__all__ = ["MODELS", "build_problem", "model_spec", "paper_grid"]


# --- Multitask-CLIP (ImageBind structure, 1.2B) ---------------------------------------------

_CLIP_EMBED = 1024  # ImageBind's joint embedding width
_CLIP_ENCODERS = {  # name: (layers, width, heads, tokens per sample)
    "vision": (32, 1280, 16, 257),  # ViT-H/14, 224 px
    "text": (24, 1024, 16, 77),
    "audio": (12, 768, 12, 229),  # ViT-B on a mel spectrogram
    "thermal": (12, 768, 12, 197),  # ViT-B
    "depth": (12, 384, 6, 197),  # ViT-S
    "imu": (6, 512, 8, 250),
}
# (modality a, modality b, global batch); the first 4, 7 or 10 form the paper's variants.
_CLIP_TASKS = (
    ("vision", "text", 1536),
    ("vision", "audio", 768),
    ("vision", "depth", 384),
    ("vision", "thermal", 384),
    ("vision", "imu", 768),
    ("text", "audio", 768),
    ("audio", "imu", 384),
    ("text", "depth", 384),
    ("text", "thermal", 384),
    ("depth", "thermal", 384),
)


def _clip(k: int) -> ModelSpec:
    comps = [Component(name, layers, width, heads, out_tokens=1)
             for name, (layers, width, heads, _) in _CLIP_ENCODERS.items()]
    comps.append(Component("loss", 1, _CLIP_EMBED, kind="loss"))
    tasks = []
    for a, b, batch in _CLIP_TASKS[:k]:
        seq = {a: _CLIP_ENCODERS[a][3], b: _CLIP_ENCODERS[b][3], "loss": 1}
        tasks.append(Task(f"{a}-{b}", batch, seq, ((a, "loss"), (b, "loss"))))
    return ModelSpec("multitask-clip", tuple(comps), tuple(tasks))


# --- OFASys (0.66B): modality adaptors + a unified encoder-decoder LM ------------------------

_OFA_WIDTH = 1024
_OFA_VOCAB = 59457  # BPE + image codes + location bins
_OFA_COMPONENTS = (
    Component("text_adaptor", 1, _OFA_WIDTH, mlp=_OFA_WIDTH, kind="linear"),  # embedding proj.
    Component("vision_adaptor", 12, 768, 12),  # 384 px, 16 px patches -> 577 tokens
    Component("audio_adaptor", 12, 768, 12),  # fbank frames after 4x subsampling
    Component("motion_adaptor", 6, 512, 8),  # HumanML3D-style pose frames (output side)
    Component("structure_adaptor", 6, 512, 8),  # linearised tables / graphs
    Component("box_adaptor", 1, _OFA_WIDTH, mlp=_OFA_WIDTH, kind="linear"),  # box outputs
    Component("lm_encoder", 12, _OFA_WIDTH, 16),
    # A decoder layer adds cross-attention (4 h^2 more weights and 8 h^2 FLOPs per token);
    # folding it into a wider MLP (mlp = 4h + 2h) keeps both counts exact.
    Component("lm_decoder", 12, _OFA_WIDTH, 16, mlp=6 * _OFA_WIDTH),
    Component("lm_head", 1, _OFA_WIDTH, mlp=_OFA_VOCAB, kind="linear"),  # logits of text outputs
)
# name: (batch, {input component: tokens}, encoder tokens, decoder tokens, output component)
_OFA_TASKS = (
    ("caption", 384, {"vision_adaptor": 577, "text_adaptor": 20}, 597, 20, ("lm_head", 20)),
    ("asr", 384, {"audio_adaptor": 400}, 400, 40, ("lm_head", 40)),
    ("grounding", 192, {"vision_adaptor": 577, "text_adaptor": 30}, 607, 4, ("box_adaptor", 4)),
    ("text2motion", 192, {"text_adaptor": 30}, 30, 49, ("motion_adaptor", 196)),
    ("vqa", 384, {"vision_adaptor": 577, "text_adaptor": 40}, 617, 8, ("lm_head", 8)),
    ("summarize", 192, {"text_adaptor": 512}, 512, 64, ("lm_head", 64)),
    ("table2text", 192, {"structure_adaptor": 256}, 256, 64, ("lm_head", 64)),
)


def _ofasys(k: int) -> ModelSpec:
    tasks = []
    for name, batch, inputs, enc, dec, out in _OFA_TASKS[:k]:
        seq = dict(inputs)
        seq["lm_encoder"], seq["lm_decoder"] = enc, dec
        flows = [(c, "lm_encoder") for c in inputs] + [("lm_encoder", "lm_decoder")]
        seq[out[0]] = out[1]
        flows.append(("lm_decoder", out[0]))
        tasks.append(Task(name, batch, seq, tuple(flows)))
    return ModelSpec("ofasys", _OFA_COMPONENTS, tuple(tasks))


# --- QWen-VAL (9.25B): ViT-bigG + Whisper-large + Qwen-7B ------------------------------------

_QWEN_VOCAB = 151936
_QWEN_COMPONENTS = (
    Component("vision", 48, 1664, 16, mlp=8192),  # ViT-bigG/14, 448 px -> 1024 patches
    Component("vision_resampler", 1, 1664, mlp=4096, kind="linear", out_tokens=256),
    Component("audio", 32, 1280, 20),  # Whisper-large encoder over 1500 frames
    Component("audio_proj", 1, 1280, mlp=4096, kind="linear"),  # after 2x pooling: 750 tokens
    Component("llm", 32, 4096, 32, mlp=11008, gated=True),  # Qwen-7B, SwiGLU MLP
    Component("lm_head", 1, 4096, mlp=_QWEN_VOCAB, kind="linear"),  # logits of text tokens
)
_QWEN_TEXT = 128  # text tokens per sample (prompt + answer)
_QWEN_TASKS = (  # name, batch, uses vision, uses audio
    ("VL", 384, True, False),
    ("AL", 192, False, True),
    ("VAL", 192, True, True),
)


def _qwen(k: int) -> ModelSpec:
    tasks = []
    for name, batch, vision, audio in _QWEN_TASKS[:k]:
        seq, flows, llm = {}, [], _QWEN_TEXT
        if vision:
            seq.update(vision=1024, vision_resampler=1024)
            flows += [("vision", "vision_resampler"), ("vision_resampler", "llm")]
            llm += 256
        if audio:
            seq.update(audio=1500, audio_proj=750)
            flows += [("audio", "audio_proj"), ("audio_proj", "llm")]
            llm += 750
        seq.update(llm=llm, lm_head=_QWEN_TEXT)
        flows.append(("llm", "lm_head"))
        tasks.append(Task(name, batch, seq, tuple(flows)))
    return ModelSpec("qwen-val", _QWEN_COMPONENTS, tuple(tasks))


# --- registry --------------------------------------------------------------------------------

MODELS = {
    "multitask-clip": (_clip, len(_CLIP_TASKS)),
    "ofasys": (_ofasys, len(_OFA_TASKS)),
    "qwen-val": (_qwen, len(_QWEN_TASKS)),
}


def model_spec(name: str, tasks: int | Sequence[str] | None = None) -> ModelSpec:
    """The zoo model `name` with its first `tasks` tasks (None: all), or the named tasks."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    build, most = MODELS[name]
    if tasks is None:
        return build(most)
    if isinstance(tasks, int) and not isinstance(tasks, bool):
        if not 1 <= tasks <= most:
            raise ValueError(f"tasks for {name!r} must be in [1, {most}], got {tasks}")
        return build(tasks)
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be an int, a sequence of task names or None, got {tasks!r}")
    full = build(most)
    by_name = {t.name: t for t in full.tasks}
    unknown = [t for t in tasks if t not in by_name]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct names from {list(by_name)}, got {list(tasks)}")
    return ModelSpec(name, full.components, tuple(by_name[t] for t in tasks))


def build_problem(name: str, tasks: int | Sequence[str] | None = None, gpus: int = 8, cost=None,
                  island_size: int = 8, device_memory_gb: float | None = None,
                  activation_checkpointing: bool = False, optimizer_sharding: bool = False) -> dict:
    """The planner problem of zoo model `name` on `gpus` devices (default cost: A800 cluster);
    `activation_checkpointing` and `optimizer_sharding` as in `graph.to_problem`."""
    return to_problem(model_spec(name, tasks), gpus, island_size=min(island_size, gpus),
                      cost=cost, device_memory_gb=device_memory_gb,
                      activation_checkpointing=activation_checkpointing,
                      optimizer_sharding=optimizer_sharding)


def paper_grid() -> list[tuple[str, int, int]]:
    """(model, tasks, gpus) settings the paper evaluates; OFASys pairs are our choice within
    the paper's "4 and 7 tasks on 8-32 GPUs"."""
    return [
        ("multitask-clip", 4, 8), ("multitask-clip", 7, 16), ("multitask-clip", 10, 32),
        ("ofasys", 4, 8), ("ofasys", 4, 16), ("ofasys", 7, 16), ("ofasys", 7, 32),
        ("qwen-val", 3, 32), ("qwen-val", 3, 64),
    ]
