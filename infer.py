#!/usr/bin/env python
"""Talk to a fine-tuned model, compare it with its base, or ship it.

    python infer.py --adapter out/ --prompt "Tell me a joke"          # one answer, streamed
    python infer.py --adapter out/ --prompts-file prompts.jsonl       # many, in batches
    python infer.py --adapter out/                                    # chat (on a terminal)
    python infer.py --adapter out/ --compare --prompt "..."           # base (blue) vs fine-tuned (green)
    python infer.py --adapter out/ --merge merged/                    # standalone Hugging Face folder
    python infer.py --adapter out/ --gguf model.gguf --gguf-type q8_0 # llama.cpp file
    python infer.py --adapter out/ --gguf-lora adapter.gguf --verify  # the adapter alone, run in llama.cpp
    python infer.py --adapter out/ --ollama ollama/                   # GGUF + Modelfile for ollama create
    python infer.py --adapter out/ --mlx-adapter mlx/                 # mlx-lm adapter (Apple silicon)
    python infer.py --adapter out/ --push-to-hub you/name [--private] # upload (or what was exported)

The adapter folder is train.py's --out: the base model, prompt template and quantisation are
read from it, so prompts are formatted exactly as in training. Bad input (adapter folder, base
model files, flags, prompts, export target) prints one line and exits 2 before anything is
written; an output that cannot be written (disk full, read-only folder) prints one line naming
the path and exits 1, as does an export that does not read back as the model in memory (every
export is read back and checked: phicore.export.verify), running out of GPU memory, torch.compile
failing (--compile) or a failed hub upload (no token to push with is bad input: 2, found before
the model is loaded). --debug adds the traceback to those lines; any other error is a bug and
shows its traceback anyway.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from pathlib import Path
from typing import Optional

from phicore.compile import COMPILE_MODES, compile_failure, compile_model
from phicore.export import ExportError
from phicore.export.targets import (ExportOptions, OutputError, check_targets, check_writable, export, push,
                                    writing)
from phicore.hub_push import HubTokenError, HubUploadError
from phicore.inference import GenerationSettings, InferenceError, check_text, load_session, read_prompts
from phicore.settings import SettingsError, build_parser, check, cli_values, normalize_argv, setting
from phicore.weights import DTYPE_NAMES

DESCRIPTION = "Generate with, compare, merge or export a phicore / PEFT LoRA adapter."


@dataclasses.dataclass
class InferOptions:
    """infer.py's flags besides the generation settings (phicore.inference.GenerationSettings)."""

    adapter: Optional[str] = setting(None, "adapter folder: train.py's --out, or one of its checkpoints (required)",
                                     section="adapter", metavar="DIR")
    base: Optional[str] = setting(None, "base model (preset, hub id or folder) instead of the one the adapter "
                                  "records", section="adapter", metavar="MODEL")
    prompt: Optional[str] = setting(None, "answer this prompt once", section="prompts", metavar="TEXT")
    prompts_file: Optional[str] = setting(None, "answer every prompt of a file: one per line, or JSONL with "
                                          "'prompt' ('-' reads stdin)", section="prompts", metavar="FILE")
    system: Optional[str] = setting(None, "system message (chat-template models)", section="prompts", metavar="TEXT")
    output: Optional[str] = setting(None, "with --prompts-file: also write the answers as JSONL to this file",
                                    section="prompts", metavar="FILE")
    batch_size: int = setting(8, "prompts generated together with --prompts-file", section="prompts",
                              range="[1, inf)")
    compare: bool = setting(False, "show the base model's answer too (the same weights, adapter switched off) next "
                            "to the fine-tuned one", section="output")
    layout: str = setting("stacked", "--compare: one under the other, or in columns", section="output",
                          choices=("stacked", "side"))
    stream: bool = setting(True, "print answers token by token (--no-stream: when complete)", section="output")
    quiet: bool = setting(False, "no loading messages or progress bars", section="output")
    debug: bool = setting(False, "show the traceback of known errors too (bad input, unwritable output)",
                          section="output")
    device: Optional[str] = setting(None, "cpu, cuda, cuda:1, mps (default: the best available)", section="device")
    plan: bool = setting(False, "print the memory plan of generating (weights, adapter(s), KV cache, prefill) "
                         "against the device's free memory and exit; prompts of --max-new-tokens length assumed "
                         "unless --prompt is given", section="device")
    dtype: Optional[str] = setting(None, "default: fp32 on CPU, bf16 on GPU", section="device", choices=DTYPE_NAMES)
    quantize: Optional[str] = setting(None, "hold the base in 4-bit NF4 (default: as the adapter was trained)",
                                      section="device", choices=("nf4",))
    compile: bool = setting(False, "torch.compile the decoder layers; decoding then uses a static KV cache, so each "
                            "new token reuses one compiled step (the same greedy tokens as without). The first "
                            "prompt pays the compile (~18 s for a small model on a CPU thread): for many prompts, "
                            "not one", section="device")
    compile_mode: str = setting("default", "with --compile: torch.compile's mode (reduce-overhead: CUDA graphs)",
                                section="device", choices=COMPILE_MODES)
    dense_base: str = setting("auto", "with an NF4 base: hold it dequantised, once, in the compute dtype: the "
                              "same weights, decoded with dense matmuls instead of dequantising every weight for "
                              "every token; auto: on CPU and MPS when the memory planner fits the dense base in "
                              "free memory (the banner says which)", section="device", choices=("auto", "yes", "no"))

    def __post_init__(self):
        check(self)
        if self.adapter is None:
            raise SettingsError("--adapter is required (train.py's --out folder)", field="adapter")
        if self.prompt is not None and self.prompts_file is not None:
            raise SettingsError("give --prompt or --prompts-file, not both", field="prompt")
        if self.output and self.prompts_file is None:
            raise SettingsError("--output needs --prompts-file", field="output")


def parse_command_line(argv=None) -> tuple:
    """(InferOptions, ExportOptions, GenerationSettings) from the flags; SettingsError names a bad one."""
    classes = (InferOptions, ExportOptions, GenerationSettings)
    parser = build_parser(classes, prog="infer.py", description=DESCRIPTION,
                          epilog="Every flag is also accepted in snake_case (--max_new_tokens).")
    namespace = parser.parse_args(normalize_argv(parser, sys.argv[1:] if argv is None else list(argv)))
    args, exports, settings = (cls(**cli_values(cls, namespace)) for cls in classes)
    if exports.merges and args.quantize:
        raise SettingsError("--quantize cannot be combined with --merge/--gguf/--ollama: merging needs the dense "
                            "base (a QLoRA adapter's NF4 base is loaded and dequantised automatically)",
                            field="quantize")
    return args, exports, settings


def _check_targets(args, exports, interactive: bool) -> None:
    """What needs the file system or the terminal, checked before loading the model."""
    asked = args.prompt is not None or args.prompts_file is not None or exports.exporting or exports.push_to_hub
    if not asked and not interactive:
        raise InferenceError("nothing to do: give --prompt or --prompts-file (stdin is not a terminal for a chat; "
                             "--prompts-file - reads prompts from it), or --merge / --gguf")
    if args.prompt is not None:
        check_text(args.prompt, "--prompt")
    if args.system is not None:
        check_text(args.system, "--system")
    if args.output:
        if Path(args.output).is_dir():
            raise InferenceError(f"--output {args.output}: is a folder; give a file name such as answers.jsonl")
        check_writable("--output", args.output)
    check_targets(exports)


def _write_jsonl(path: str, results) -> None:
    from phicore.weights import atomic_write_text

    lines = []
    for r in results:
        record = {"prompt": r.prompt, "response": r.tuned.text}
        if r.base is not None:
            record["base_response"] = r.base.text
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    with writing("--output", path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(path), "".join(lines))


def _hold_base_dense(args, model) -> Optional[str]:
    """Dequantise a loaded NF4 base once (FrozenLinear.dequantize_), or not; the banner's line
    saying which. --dense-base yes/no decide; auto: not on CUDA (the NF4 gemv kernel decodes
    from the 4-bit bytes there, and GPU memory is the scarce one); on CPU and MPS when the dense
    base fits the free memory by the planner (decoding then costs one matmul per weight, not a
    dequantise too)."""
    from phicore.frozen_linear import FrozenLinear, dequantize_frozen_linears
    from phicore.memory_plan import device_budget, plan_generation

    nf4 = any(isinstance(module, FrozenLinear) and module.is_nf4 for module in model.modules())
    if not nf4 or args.dense_base == "no" or (args.dense_base == "auto" and model.device.type == "cuda"):
        return None
    if args.dense_base == "yes":
        dequantize_frozen_linears(model)
        return "NF4 base dequantised once (--dense-base yes)"
    dtype = model.dtype
    plan = plan_generation(model.config, batch_size=args.batch_size, prompt_tokens=512, new_tokens=512,
                           weight_bytes=dtype.itemsize)
    budget = device_budget(model.device)
    need, have = plan.peak_bytes / 2**30, budget.usable_bytes / 2**30
    if plan.peak_bytes > budget.usable_bytes:
        return (f"NF4 base kept in 4-bit: dequantised it would need {need:.2f} GiB, {have:.2f} GiB free "
                "(each token dequantises every weight)")
    dequantize_frozen_linears(model)
    return (f"NF4 base dequantised once into {str(dtype).replace('torch.', '')} ({need:.2f} GiB planned, "
            f"{have:.2f} GiB free): dense decoding on {model.device.type} (--dense-base no keeps it 4-bit)")


def generation_plan(args, settings) -> str:
    """infer.py --plan: the planner's generation terms for this adapter's base (config.json only)."""
    import torch

    from phicore.inference import read_adapter_info
    from phicore.memory_plan import device_budget, plan_generation
    from phicore.train.batch_size import model_config_for
    from phicore.train.config import UsageError
    from phicore.weights import default_device, default_dtype, parse_dtype

    info = read_adapter_info(args.adapter, args.base)
    try:
        model_config = model_config_for(info.base_model)
    except UsageError as err:
        raise InferenceError(str(err)) from None
    device = torch.device(args.device) if args.device else default_device()
    dtype = parse_dtype(args.dtype) or default_dtype(device)
    quantize = args.quantize or ((info.quantization or {}).get("type"))
    prompt_tokens = len(args.prompt) // 3 + 16 if args.prompt else settings.max_new_tokens  # ~3 characters a token
    rows = args.batch_size if args.prompts_file else 1
    targets = info.adapter_config.get("target_modules") or "all-linear"
    plan = plan_generation(model_config, batch_size=rows, prompt_tokens=prompt_tokens,
                           new_tokens=settings.max_new_tokens, weight_bytes=dtype.itemsize, quantize=quantize,
                           lora_r=int(info.adapter_config.get("r", 16)),
                           targets=targets if isinstance(targets, str) else ",".join(targets),
                           adapters=1)  # --compare switches the same adapter off: one base, one adapter
    return plan.table(device_budget(device))


def main(argv=None, *, stdin=None, stdout=None) -> int:
    """infer.py: 0 done, 2 bad input, 1 an output that could not be written or out of (GPU) memory,
    130 Ctrl-C."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    try:
        args, exports, settings = parse_command_line(argv)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def log(message: str) -> None:
        if not args.quiet or message.startswith(("warning", "note")):
            print(message, file=sys.stderr)

    def fail(err: BaseException, code: int, message: Optional[str] = None) -> int:
        if args.debug:
            traceback.print_exception(type(err), err, err.__traceback__)
        print(f"error: {message or err}", file=sys.stderr)
        return code

    try:
        _check_targets(args, exports, interactive=stdin.isatty())
        prompts = read_prompts(args.prompts_file, stdin) if args.prompts_file is not None else None
        if exports.push_to_hub and not exports.exporting and args.prompt is None and prompts is None:
            from phicore.inference import read_adapter_info

            push(exports, read_adapter_info(args.adapter, args.base).directory, log)  # no model needed
            return 0
        if args.plan:  # the memory plan, nothing loaded
            print(generation_plan(args, settings), file=stdout)
            return 0
        session = load_session(args.adapter, base=args.base, device=args.device, dtype=args.dtype,
                               quantize=args.quantize, dense=exports.merges, warn=log)
        note = _hold_base_dense(args, session.model)
        if note:
            log(note)
        if session.model.device.type == "cpu":  # once the model is built, as train.py
            from phicore.host_memory import keep_freed_host_memory

            keep_freed_host_memory()  # prefill's large blocks reused, not faulted in again (phicore/host_memory.py)
        if args.compile:
            compile_model(session.model, mode=args.compile_mode)
        _run(args, exports, settings, session, prompts, stdout, log)
    except (InferenceError, ExportError) as err:  # bad input
        return fail(err, 2)
    except OutputError as err:  # an output that could not be written
        return fail(err, 1)
    except HubTokenError as err:  # nothing to authenticate with
        return fail(err, 2)
    except HubUploadError as err:  # the hub refused the upload, or the network failed
        return fail(err, 1)
    except _out_of_memory() as err:
        first = (str(err).strip().splitlines() or [""])[0]
        return fail(err, 1, f"out of memory ({first}); try a smaller --batch-size or --max-new-tokens, "
                            "--quantize nf4, or another --device")
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # --compile: the compiler failing is one line, exit 1
        message = compile_failure(err, "the decoder layers") if args.compile else None
        if message is None:
            raise
        return fail(err, 1, message)
    return 0


def _run(args, exports, settings, session, prompts, stdout, log) -> None:
    from phicore.console import Console

    log(f"base {session.info.base_model} ({session.model.dtype}, {session.model.device}), "
        f"prompt format {session.prompt_format.name}, stops on {len(session.stop_ids)} token(s)"
        + (f" and {session.text_stops}" if session.text_stops else ""))
    console = Console(session, settings, stdout, compare=args.compare, layout=args.layout, stream=args.stream,
                      system=args.system, batch_size=args.batch_size)
    if args.prompt is not None:
        console.answer(args.prompt)
    elif prompts is not None:
        results = console.answer_all(prompts)
        if args.output:
            _write_jsonl(args.output, results)
            log(f"answers written to {args.output}")
    elif not exports.exporting:
        console.chat()
    if exports.exporting:
        export(exports, session, system=args.system, show_progress=not args.quiet, log=log)
    if exports.push_to_hub:
        push(exports, session.info.directory, log)


def _out_of_memory() -> tuple:
    """torch's out-of-memory error (a GPU allocation that failed); evaluated only while an
    exception is being handled."""
    import torch

    return (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


if __name__ == "__main__":
    sys.exit(main())
