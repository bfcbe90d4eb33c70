"""The planner's memory estimate against what CUDA allocates: `train` on one GPU for a few
steps, per model size and with and without activation checkpointing; each run records the
estimate for its rank (``memory_estimate_gb``: weights, gradients, AdamW state, activations,
``MultiTaskModel.to_problem``) and ``torch.cuda.max_memory_allocated`` (``peak_memory_gb``).
On a CPU the peak is None and only the estimates are written (a smoke run).

    python bench/memory_check.py [--json OUT.json] [--markdown OUT.md] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from scheduler.trainer import TrainConfig, train

# (model, its options): the built-in models at their size and widened so that weights and
# optimizer state dominate what the caching allocator adds.
CASES = [("tiny-clip", {}), ("tiny-clip", {"hidden": 512, "layers": 4}),
         ("tiny-val", {}), ("tiny-val", {"hidden": 512, "layers": 4})]


def rows(steps: int) -> list[dict]:
    out = []
    for model, options in CASES:
        for checkpointing in (False, True):
            cfg = TrainConfig(model=model, model_options=options, steps=steps, method="spindle",
                              activation_checkpointing=checkpointing, progress=False,
                              log_every=0)
            r = train(cfg)
            est, peak = r["memory_estimate_gb"], r["peak_memory_gb"]
            out.append({"model": model, "options": options, "checkpointing": checkpointing,
                        "precision": "bf16 autocast" if torch.cuda.is_available() else "fp32",
                        "estimate_gb": est, "peak_gb": peak,
                        "peak_over_estimate": None if peak is None else peak / est})
    return out


def markdown(table: list[dict]) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no peak)"
    lines = [f"device: {device}; torch {torch.__version__}", "",
             "| model | options | checkpointing | estimate GB | CUDA peak GB | peak / estimate |",
             "|---|---|---|---|---|---|"]
    for r in table:
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.4f}"
        ratio = "-" if r["peak_over_estimate"] is None else f"{r['peak_over_estimate']:.2f}"
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "default"
        lines.append(f"| {r['model']} | {opts} | {r['checkpointing']} | {r['estimate_gb']:.4f} "
                     f"| {peak} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    table = rows(args.steps)
    text = markdown(table)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                       "torch": torch.__version__, "rows": table}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
