"""Host-side work of one LoRA layer: the aten ops a forward + backward dispatches.

    python bench/lora_host_ops.py

A training step on a fast GPU waits on the host that launches its kernels (bench/NOTES.md,
"Measured on a GPU"), so every op a layer dispatches costs time there even when its arithmetic
is free. This counts them with torch.profiler on a tiny layer on CPU (the count does not depend
on the machine's load; wall times on a shared machine do): dense base and NF4 base, LoRA r=4.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phicore.frozen_linear import quantize_model_linears  # noqa: E402
from phicore.lora import apply_lora  # noqa: E402


def aten_ops(nf4: bool) -> Counter:
    torch.manual_seed(0)
    holder = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
    if nf4:
        quantize_model_linears(holder)
    apply_lora(holder, r=4, alpha=8, dropout=0.0)
    holder.train()
    x = torch.randn(2, 8, 64, requires_grad=True)
    holder(x).sum().backward()  # warm-up
    with torch.profiler.profile() as profile:
        holder(x).sum().backward()
    return Counter(event.name for event in profile.events() if event.name.startswith("aten::"))


def main() -> int:
    for nf4 in (False, True):
        ops = aten_ops(nf4)
        print(f"{'NF4' if nf4 else 'dense'} base: {sum(ops.values())} aten ops per forward + backward; most: "
              + ", ".join(f"{name} {count}" for name, count in ops.most_common(5)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
