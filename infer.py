#!/usr/bin/env python
"""Talk to a fine-tuned model, compare it with its base, or ship it.

    python infer.py --adapter out/ --prompt "Tell me a joke"          # one answer, streamed
    python infer.py --adapter out/ --prompts-file prompts.jsonl       # many, in batches
    python infer.py --adapter out/                                    # chat (on a terminal)
    python infer.py --adapter out/ --compare --prompt "..."           # base (blue) vs fine-tuned (green)
    python infer.py --adapter out/ --merge merged/                    # standalone Hugging Face folder
    python infer.py --adapter out/ --gguf model.gguf --gguf-type q8_0 # llama.cpp file

The adapter folder is train.py's --out: the base model, prompt template and quantisation are
read from it, so prompts are formatted exactly as in training. Bad input (adapter folder, base,
flags, prompts file, export target) prints one line and exits 2 before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from phicore.export import ExportError
from phicore.inference import GenerationSettings, InferenceError, load_session, read_prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate with, compare, merge or export a phicore / PEFT LoRA adapter.")
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")
    a = p.add_argument
    a("--adapter", required=True, help="adapter folder (train.py's --out, or one of its checkpoints)")
    a("--base", default=None, help="base model (preset, hub id or folder) instead of the one the adapter records")
    a("--prompt", default=None, help="answer this prompt once")
    a("--prompts-file", default=None, help="answer every prompt of a file: one per line, or JSONL with 'prompt' "
                                           "('-' reads stdin)")
    a("--system", default=None, help="system message (chat-template models)")
    a("--output", default=None, help="with --prompts-file: also write the answers as JSONL to this file")
    a("--compare", action="store_true", help="show the base model's answer too (the same weights, adapter switched off) next to the fine-tuned one")
    a("--layout", choices=["stacked", "side"], default="stacked", help="--compare: one under the other, or in columns")
    a("--no-stream", dest="stream", action="store_false", help="print answers when complete, not token by token")
    a("--batch-size", type=int, default=8, help="prompts generated together with --prompts-file")
    a("--max-new-tokens", type=int, default=256, help="most tokens per answer")
    a("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (deterministic)")
    a("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    a("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    a("--repetition-penalty", type=float, default=1.0, help="penalise tokens already in the text (1 = off)")
    a("--seed", type=int, default=None, help="sampling seed")
    a("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    a("--dtype", default=None, help="fp32, bf16, fp16 (default: fp32 on CPU, bf16 on GPU)")
    a("--quantize", choices=["nf4"], default=None,
      help="hold the base in 4-bit NF4 (default: as the adapter was trained)")
    a("--merge", default=None, metavar="DIR", help="write base + adapter merged as a Hugging Face folder")
    a("--max-shard-size", default="5GB", help="--merge: largest safetensors shard (e.g. 5GB, 500MB)")
    a("--gguf", default=None, metavar="FILE", help="write base + adapter merged as a GGUF file for llama.cpp")
    a("--gguf-type", choices=["f16", "bf16", "q8_0"], default="f16", help="--gguf: weight type")
    a("--quiet", action="store_true", help="no loading messages or progress bars")
    return p


def _check_args(args, interactive: bool) -> None:
    """Everything that can be checked before loading the model."""
    from phicore.export.merge import check_target_folder, parse_size

    if args.prompt is not None and args.prompts_file is not None:
        raise InferenceError("give --prompt or --prompts-file, not both")
    if args.batch_size < 1:
        raise InferenceError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.output and args.prompts_file is None:
        raise InferenceError("--output needs --prompts-file")
    asked = args.prompt is not None or args.prompts_file is not None or args.merge or args.gguf
    if not asked and not interactive:
        raise InferenceError("nothing to do: give --prompt or --prompts-file (stdin is not a terminal for a chat; "
                             "--prompts-file - reads prompts from it), or --merge / --gguf")
    if (args.merge or args.gguf) and args.quantize:
        raise InferenceError("--quantize cannot be combined with --merge/--gguf: merging needs the dense base "
                             "(a QLoRA adapter's NF4 base is loaded and dequantised automatically)")
    if args.merge:
        check_target_folder(args.merge)
        args.max_shard_bytes = parse_size(args.max_shard_size)
    if args.gguf:
        from phicore.export.gguf import import_gguf

        import_gguf()
        if Path(args.gguf).is_dir():
            raise InferenceError(f"--gguf {args.gguf}: is a folder; give a file name such as model.gguf")


def _write_jsonl(path: str, results) -> None:
    from phicore.weights import atomic_write_text

    lines = []
    for r in results:
        record = {"prompt": r.prompt, "response": r.tuned.text}
        if r.base is not None:
            record["base_response"] = r.base.text
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), "".join(lines))


def _export(args, session, log) -> None:
    from phicore.export.merge import merge_adapter, qlora_note, save_merged

    merge_adapter(session.model)  # in place: the session's model is now base + adapter, merged
    if session.info.quantized:
        log(qlora_note(session.model.dtype))
    if args.merge:
        save_merged(session.model, session.tokenizer, args.merge, stop_ids=session.stop_ids,
                    max_shard_bytes=args.max_shard_bytes)
        log(f"merged model written to {args.merge}")
    if args.gguf:
        from phicore.export.gguf import find_sentencepiece_model, write_gguf

        spm = find_sentencepiece_model([session.info.directory, session.info.base_model])
        write_gguf(session.model, session.tokenizer, args.gguf, args.gguf_type, name=Path(args.gguf).stem,
                   sentencepiece_model=spm, show_progress=not args.quiet, warn=log)
        log(f"GGUF ({args.gguf_type}) written to {args.gguf}")


def main(argv=None, *, stdin=None, stdout=None) -> int:
    args = build_parser().parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    def log(message: str) -> None:
        if not args.quiet or message.startswith(("warning", "note")):
            print(message, file=sys.stderr)

    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                  args.repetition_penalty, args.seed)
    try:
        settings.check()
        _check_args(args, interactive=stdin.isatty())
        prompts = read_prompts(args.prompts_file, stdin) if args.prompts_file is not None else None
        session = load_session(args.adapter, base=args.base, device=args.device, dtype=args.dtype,
                               quantize=args.quantize, dense=bool(args.merge or args.gguf), warn=log)
    except (InferenceError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from phicore.console import Console

    log(f"base {session.info.base_model} ({session.model.dtype}, {session.model.device}), "
        f"prompt format {session.prompt_format.name}, stops on {len(session.stop_ids)} token(s)"
        + (f" and {session.text_stops}" if session.text_stops else ""))
    console = Console(session, settings, stdout, compare=args.compare, layout=args.layout, stream=args.stream,
                      system=args.system, batch_size=args.batch_size)
    try:
        if args.prompt is not None:
            console.answer(args.prompt)
        elif prompts is not None:
            results = console.answer_all(prompts)
            if args.output:
                _write_jsonl(args.output, results)
                log(f"answers written to {args.output}")
        elif not (args.merge or args.gguf):
            console.chat()
        if args.merge or args.gguf:
            _export(args, session, log)
    except (InferenceError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
