#!/usr/bin/env python
"""Fine-tune a Phi model with LoRA on a data file.

    python train.py --model phi-2 --data humor.jsonl --out out/
    python train.py --model tiny-phi-2 --data examples/humor.jsonl     # offline demo, ~1 min on CPU
    python train.py --config run.toml --lr 1e-4                        # a config file, one flag changed
    torchrun --nproc_per_node=4 train.py --model phi-2 --data humor.jsonl --out out/   # 4 GPUs, DDP

The flags are phicore.train.config.RunConfig's fields; this file only turns them into a
RunConfig, calls phicore.finetune and turns what happens into one line and an exit status:

    0    done (or the run in --out was already complete), or paused at --stop-after
    2    bad input (flags, config file, data file, model folder, output folder, checkpoint),
         found before anything in --out is written or replaced
    1    a failure while running: training diverged (the last finite checkpoint is kept), a full
         disk or another write error, torch.compile failing (--compile; the line names the part)
    130  Ctrl-C, 143 SIGTERM: a checkpoint was written (during training), --resume auto continues

--debug shows the Python traceback of those errors too; anything else (a bug) always shows it.
"""

from __future__ import annotations

import signal
import sys

DESCRIPTION = "LoRA / QLoRA fine-tuning of Phi-2 and Phi-3 family models."


class Terminated(Exception):
    """SIGTERM before the training loop (which turns it into a checkpoint) has started."""


def _terminate(signum, frame):
    raise Terminated


def main(argv=None) -> int:
    from phicore.settings import SettingsError
    from phicore.train.config import RunConfig, UsageError

    try:
        config = RunConfig.from_command_line(argv, prog="train.py", description=DESCRIPTION)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from phicore.train.distributed import DistContext
    from phicore.train.run import finetune

    main_rank = DistContext.from_env().is_main

    def fail(message: str, code: int) -> int:
        if config.debug:
            raise
        if main_rank:
            print(f"error: {message}", file=sys.stderr)
        return code

    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        previous = None
    try:
        if config.plan:  # the memory plan, nothing trained
            from phicore.train.batch_size import plan_report

            print(plan_report(config))
            return 0
        result = finetune(config)
    except UsageError as err:
        return fail(str(err), 2)
    except FloatingPointError as err:  # training diverged; the last finite adapter is in a checkpoint
        return fail(str(err), 1)
    except OSError as err:  # a full disk, a folder that became read-only, ...
        where = f"{err.filename}: " if err.filename else ""
        return fail(f"{where}{err.strerror or err} (nothing finished was replaced)", 1)
    except (KeyboardInterrupt, Terminated) as err:
        code = 130 if isinstance(err, KeyboardInterrupt) else 143
        return fail("interrupted before training started; nothing to resume", code)
    except Exception as err:  # --compile: the compiler failing (first forward or backward) is one line, exit 1
        from phicore.compile import compile_failure

        message = compile_failure(err) if config.compile else None
        if message is None:
            raise
        return fail(message, 1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 128 + result.signal if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
