#!/usr/bin/env python
"""Fine-tune a Phi model with LoRA on a data file.

    python train.py --model phi-2 --data humor.jsonl --out out/
    python train.py --model tiny-phi-2 --data examples/humor.jsonl     # offline demo, ~1 min on CPU
    python train.py --config run.toml --lr 1e-4                        # a config file, one flag changed
    torchrun --nproc_per_node=4 train.py --model phi-2 --data humor.jsonl --out out/   # 4 GPUs, DDP

The flags are phicore.train.config.RunConfig's fields; this file only turns them into a
RunConfig and calls phicore.finetune. Bad input (data file, flags, config file, model folder)
prints one line naming the problem and exits 2, before anything in --out is written or
overwritten; a run that fails while training exits 1; Ctrl-C writes a checkpoint and exits 130.
"""

from __future__ import annotations

import sys

DESCRIPTION = "LoRA / QLoRA fine-tuning of Phi-2 and Phi-3 family models."


def main(argv=None) -> int:
    from phicore.settings import SettingsError
    from phicore.train.config import RunConfig

    try:
        config = RunConfig.from_command_line(argv, prog="train.py", description=DESCRIPTION)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from phicore.train.distributed import DistContext
    from phicore.train.run import UsageError, finetune

    try:
        result = finetune(config)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # training diverged; the last finite adapter is in a checkpoint
        if DistContext.from_env().is_main:
            print(f"error: {err}", file=sys.stderr)
        return 1
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
