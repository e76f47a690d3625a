#!/usr/bin/env python
"""Fine-tune a Phi model with LoRA on a data file.

    python train.py --model phi-2 --data humor.jsonl --out out/
    python train.py --model tiny-phi-2 --data examples/humor.jsonl     # offline demo, ~1 min on CPU
    torchrun --nproc_per_node=4 train.py --model phi-2 --data humor.jsonl --out out/   # 4 GPUs, DDP

Bad input (data file, flags, model folder) prints one line naming the problem and exits 2,
before anything in --out is written or overwritten.
"""

from __future__ import annotations

import argparse
import math
import sys

from phicore.train.run import UsageError, prepare_run


def _bool_flag(parser, name: str, default: bool, help: str, *aliases: str):
    parser.add_argument(f"--{name}", *aliases, dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                        default=default, help=help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LoRA / QLoRA fine-tuning of Phi-2 and Phi-3 family models.")
    # one line naming the flag (as the docstring promises), not argparse's usage dump before it
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")
    a = p.add_argument
    a("--model", default="phi-2", help="preset (phi-2, phi-3-mini-4k, phi-3.5-mini, ..., tiny-phi-2, tiny-phi-3), "
                                      "hub id or local folder")
    a("--data", "--dataset_path", dest="data", required=True, help="training data: .jsonl, .json, .csv, .tsv, .xlsx")
    a("--out", "--output_dir", dest="out", default="out", help="output folder (adapter, checkpoints, metrics)")
    a("--format", default=None, help="force a data format instead of detecting it from the fields")
    a("--template", default=None, help='prompt format: "instruct", "chat", or a custom string with {prompt} and {response}')
    a("--val-data", default=None, help="separate validation file (default: --val-split of the training data)")
    a("--val-split", type=float, default=0.1, help="fraction of the data held out for validation (seeded)")
    a("--max-length", "--max_length", dest="max_length", type=int, default=1024, help="tokens per example; longer rows are cut")
    _bool_flag(p, "train-on-prompt", False, "compute the loss on prompt tokens too")
    _bool_flag(p, "pack", False, "pack several examples per sequence (block-diagonal attention)")
    a("--epochs", type=float, default=3, help="passes over the training data")
    a("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    a("--batch-size", "--batch_size", dest="batch_size", type=int, default=4, help="examples per micro-batch")
    a("--grad-accum", "--gradient_accumulation_steps", dest="grad_accum", type=int, default=1,
      help="micro-batches per optimizer step")
    a("--lr", "--learning_rate", dest="lr", type=float, default=None,
      help="peak learning rate (default 2e-4; 2e-3 for the random-weight tiny presets)")
    a("--warmup-ratio", "--warmup_ratio", dest="warmup_ratio", type=float, default=0.05, help="warmup fraction of steps")
    a("--warmup-steps", type=int, default=0, help="warmup steps (overrides --warmup-ratio)")
    a("--scheduler", choices=["cosine", "linear", "constant"], default="cosine", help="decay after warmup")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0 disables)")
    a("--lora-r", "--lora_r", dest="lora_r", type=int, default=16, help="LoRA rank")
    a("--lora-alpha", "--lora_alpha", dest="lora_alpha", type=float, default=32, help="LoRA alpha")
    a("--lora-dropout", "--lora_dropout", dest="lora_dropout", type=float, default=0.05, help="dropout on LoRA inputs")
    a("--targets", default="all-linear", help="comma-separated module names or all-linear (never lm_head)")
    _bool_flag(p, "use-rslora", False, "scale by alpha/sqrt(r) (rsLoRA)")
    _bool_flag(p, "use-dora", False, "weight-decomposed LoRA (DoRA)")
    _bool_flag(p, "grad-checkpointing", True, "recompute each decoder layer in backward to save memory",
               "--gradient_checkpointing")
    _bool_flag(p, "offload-checkpoints", False, "with --grad-checkpointing: hold each decoder layer's checkpointed "
               "input in pinned CPU memory until backward instead of on the GPU (saves layers x tokens x hidden "
               "x 2 bytes, ~0.4 GB for Phi-3-mini at 2048 tokens; costs two PCIe copies of each, overlapped)")
    a("--eval-every", type=int, default=None, help="evaluate every N steps (default: every epoch)")
    a("--save-every", type=int, default=None, help="write a checkpoint every N steps")
    a("--keep-last", type=int, default=2, help="checkpoints to keep")
    a("--early-stopping-patience", type=int, default=None, help="stop after N evaluations without improvement")
    a("--resume", default=None, help="checkpoint folder, or 'auto' for the latest in --out")
    a("--stop-after", type=int, default=None,
      help="write a checkpoint and stop once this many steps are done (job time limits); --resume auto continues")
    _bool_flag(p, "fsdp", False, "under torchrun: shard the frozen base and the adapter across the GPUs with "
                                 "FSDP2 (models that do not fit one GPU); not with --quantize")
    a("--data-cache", default=None, help="tokenised dataset cache folder (default: $PHICORE_CACHE_DIR or "
                                         "~/.cache/phicore/datasets)")
    a("--seed", type=int, default=42, help="seed for data order, LoRA init and dropout")
    a("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    a("--dtype", default=None, help="base weights dtype: fp32, bf16, fp16 (default: fp32 on CPU, bf16 on GPU)")
    a("--quantize", choices=["nf4"], default=None, help="QLoRA: hold the frozen base in 4-bit NF4")
    _bool_flag(p, "double-quant", True, "quantise the NF4 scales again (bitsandbytes' double quantisation)")
    a("--compute-dtype", default=None, help="dtype the NF4 base computes in (default: --dtype's)")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="autocast precision")
    _bool_flag(p, "compile", False, "torch.compile the model", "--torch_compile")
    a("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run = prepare_run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _train(run, args)
    finally:
        run.dist.shutdown()


def _train(run, args) -> int:
    from phicore.train import train

    main_rank = run.dist.is_main
    say = print if main_rank else (lambda *a, **k: None)
    say(run.summary)
    try:
        result = train(run.model, run.train_plan, run.train_config, val_plan=run.val_plan,
                       resume_from=run.resume_from, device=run.device, show_progress=not args.quiet,
                       dist=run.dist)
    except FloatingPointError as err:
        if main_rank:
            print(f"error: {err}", file=sys.stderr)
        return 1
    if result.interrupted:
        return 130
    if result.paused:
        return 0
    run.save_outputs(result)
    ppl = f", val perplexity {math.exp(result.best_val_loss):.2f}" if result.best_val_loss is not None else ""
    say(f"done: {result.steps} steps in {result.seconds:.1f}s, {result.tokens / max(result.seconds, 1e-9):.0f} tokens/s, "
        f"peak memory {result.peak_memory_bytes / 2**20:.0f} MiB, final loss {result.final_loss:.4f}{ppl}")
    say(f"adapter written to {run.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
