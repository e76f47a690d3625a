"""Running an exported GGUF in llama.cpp (llama-cpp-python) for `--verify`.

llama.cpp runs in a child process (`python -m phicore.export.llama_check REQUEST`): a native library
that aborts on a bad file, or whose CPU kernels use instructions the machine lacks, then ends
that process, not the export. The child reports tokenisations, end-of-generation flags, the
logits of the prompts and its greedy answer; the comparison with phicore happens here. After a
crash it is run once more without llama.cpp's extra CPU buffer types (repacked / AMX weights),
and the line says so.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..tokenizer import TURN_END_TOKENS
from . import VerifyError
from .gguf_vocabulary import short_ids, short_text
from .verify import _OTHER_LOGIT_BOUND, GREEDY_TOKENS, LOGIT_BOUNDS, Reference, _label


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


SKIPPED = "llama.cpp check skipped: llama-cpp-python is not installed (pip install llama-cpp-python)"


def logit_bound(weight_types: Iterable[str]) -> tuple:
    """(fraction of max(1, max |logit|), the type that sets it) for the least precise weight type."""
    worst = max(weight_types or ["F32"], key=lambda t: LOGIT_BOUNDS.get(t, _OTHER_LOGIT_BOUND))
    return LOGIT_BOUNDS.get(worst, _OTHER_LOGIT_BOUND), worst


def run_in_llama_cpp(path, ref: Reference, *, weight_types: Iterable[str], lora_path=None) -> list:
    """Load the GGUF (with an adapter: `lora_path`) in llama.cpp and compare it with `ref.model`."""
    if not llama_cpp_available():
        return [SKIPPED]
    if not ref.prompts:
        raise ValueError("run_in_llama_cpp: the Reference has no prompts")
    shown = f"{path} + {lora_path}" if lora_path else str(path)
    result = llama_cpp_run(path, prompts=ref.prompts, texts=ref.texts, stop_ids=ref.stop_ids, lora_path=lora_path)
    lines = _compare_with_llama(result, shown, ref, weight_types)
    return lines + ([f"llama.cpp: {result['note']}"] if result["note"] else [])


def llama_cpp_run(path, *, prompts: Sequence[Sequence[int]], texts: Sequence[str] = (), stop_ids: Sequence[int] = (),
                  lora_path=None, greedy_tokens: int = GREEDY_TOKENS) -> dict:
    """What llama.cpp makes of a GGUF (plus an adapter GGUF), run in a child process:
    {"tokens": ids of each text, "eog": {stop id: ends generation}, "logits": [(T, V) float32 per
    prompt], "greedy": greedy ids after prompts[0] up to an end-of-generation token, "greedy_stop":
    that token or None, "n_vocab", "note": None or what had to be worked around}.
    VerifyError when llama.cpp cannot load or run it."""
    request = {"model": str(path), "lora": str(lora_path) if lora_path else None, "texts": list(texts),
               "prompts": [list(map(int, p)) for p in prompts], "stop_ids": list(map(int, stop_ids)),
               "greedy_tokens": greedy_tokens, "n_ctx": max(len(p) for p in prompts) + greedy_tokens + 8}
    result, note = _probe(request, f"{path} + {lora_path}" if lora_path else str(path))
    result["note"] = note
    return result


def _probe(request: dict, shown: str) -> tuple:
    """(the child's result, a note or None); VerifyError if llama.cpp cannot load or run the file."""
    import signal

    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # phicore importable in the child, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="phicore-llama-") as tmp:
        note = None
        for extra_bufts in (True, False):
            request_file = Path(tmp) / "request.json"
            request_file.write_text(json.dumps({**request, "extra_bufts": extra_bufts, "out": tmp}), encoding="utf-8")
            proc = subprocess.run([sys.executable, "-m", "phicore.export.llama_check", str(request_file)], env=env,
                                  capture_output=True, text=True, errors="replace")
            if proc.returncode >= 0:
                break
            crash = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else \
                f"signal {-proc.returncode}"
            note = (f"its extra CPU buffer types (repacked/AMX weights) crashed here ({crash}); checked without "
                    "them")
        if proc.returncode < 0:
            raise VerifyError(f"{shown}: llama.cpp crashed on it ({crash}){_log_errors(proc.stderr)}")
        result_file = Path(tmp) / "result.json"
        if proc.returncode != 0 or not result_file.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise VerifyError(f"{shown}: the llama.cpp check failed ({last})")
        result = json.loads(result_file.read_text(encoding="utf-8"))
        if "error" in result:
            raise VerifyError(f"{shown}: llama.cpp cannot load it ({result['error']}){_log_errors(proc.stderr)}")
        result["logits"] = [np.load(Path(tmp) / f"logits{i}.npy") for i in range(len(request["prompts"]))]
    return result, note


def _log_errors(log: str) -> str:
    """llama.cpp's own error lines from its log, e.g. ': error loading model vocabulary: ...'."""
    errors = [line.strip() for line in log.splitlines() if "error" in line.lower() and "llama" in line.lower()]
    return f": {errors[-1]}" if errors else ""


def _probe_main(request_file: str) -> int:
    """The child: run llama.cpp as the request says, write result.json and logitsN.npy."""
    import llama_cpp

    request = json.loads(Path(request_file).read_text(encoding="utf-8"))
    out = Path(request["out"])
    if not request["extra_bufts"]:  # llama-cpp-python has no argument for it: its default parameters, here only
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = without_extra_bufts
    try:
        llm = llama_cpp.Llama(model_path=request["model"], lora_path=request["lora"], n_ctx=request["n_ctx"],
                              n_batch=request["n_ctx"], logits_all=True, verbose=True, seed=0)
    except (ValueError, RuntimeError) as err:
        (out / "result.json").write_text(json.dumps({"error": str(err)}), encoding="utf-8")
        return 0
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    result = {
        "n_vocab": llm.n_vocab(),
        "tokens": [llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in request["texts"]],
        "eog": {str(i): bool(llama_cpp.llama_vocab_is_eog(vocab, i)) for i in request["stop_ids"] if i < llm.n_vocab()},
    }
    for i, prompt in enumerate(request["prompts"]):
        llm.reset()
        llm.eval(prompt)
        np.save(out / f"logits{i}.npy", np.asarray(llm.scores[:len(prompt)], dtype=np.float32))
    llm.reset()
    llm.eval(request["prompts"][0])
    greedy, stop = [], None
    for _ in range(request["greedy_tokens"]):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            stop = token
            break
        greedy.append(token)
        llm.eval([token])
    result.update(greedy=greedy, greedy_stop=stop)
    (out / "result.json").write_text(json.dumps(result), encoding="utf-8")
    llm.close()
    return 0


def _compare_with_llama(result: dict, shown: str, ref: Reference, weight_types) -> list:
    tokenizer = ref.tokenizer
    for text, got in zip(ref.texts, result["tokens"]):
        want = tokenizer.encode(text, add_special_tokens=False)
        if got != want:
            raise VerifyError(f"{shown}: llama.cpp tokenises {short_text(text)} to {short_ids(got)}, phicore to {short_ids(want)}")
    eog = {int(i): flag for i, flag in result["eog"].items()}
    turn_ends = {tokenizer.eos_token_id} | {tokenizer.token_to_id(t) for t in TURN_END_TOKENS}
    for stop, flag in eog.items():
        if stop in turn_ends and not flag:
            raise VerifyError(f"{shown}: llama.cpp does not end generation on {tokenizer.id_to_token(stop)!r} "
                              f"(id {stop}), where phicore stops")
    name = tokenizer.id_to_token
    ends = [repr(name(i)) for i, flag in eog.items() if flag]
    others = [repr(name(i)) for i, flag in eog.items() if not flag]  # e.g. a generation_config eos list's <|assistant|>
    fraction, worst = logit_bound(weight_types)
    max_diff, bound = 0.0, 0.0
    model = ref.model
    with torch.no_grad():
        for prompt, got in zip(ref.prompts, result["logits"]):
            want = model(torch.tensor([prompt], device=model.device))[0].double().cpu().numpy()
            bound = max(bound, fraction * max(1.0, float(np.abs(want).max())))
            max_diff = max(max_diff, float(np.abs(got.astype(np.float64) - want[:, :got.shape[1]]).max()))
    label = _label(worst)
    if not max_diff <= bound:
        raise VerifyError(f"{shown}: llama.cpp's logits differ from phicore's by up to {max_diff:.4g}, above the "
                          f"bound {bound:.4g} for {label} weights")
    lines = [f"llama.cpp: loads; tokenises {len(ref.texts)} strings to phicore's ids; ends generation on "
             + ", ".join(ends) + (f"; not on {', '.join(others)} (give it as a stop string)" if others else ""),
             f"llama.cpp: max |logit difference| {max_diff:.3g} over {len(ref.prompts)} prompts "
             f"(bound {bound:.3g} for {label})"]
    lines.append(_compare_greedy(result, shown, ref, bound))
    return lines


def _compare_greedy(result: dict, shown: str, ref: Reference, bound: float) -> str:
    from ..generate import generate

    prompt = ref.prompts[0]
    full = generate(ref.model, prompt, max_new_tokens=GREEDY_TOKENS)  # greedy, cut at a stop id below
    cut = next((i for i, t in enumerate(full) if t in ref.stop_ids), len(full))
    want, phicore_stop = full[:cut], (full[cut] if cut < len(full) else None)
    got, llama_stop = result["greedy"], result["greedy_stop"]
    name = ref.tokenizer.id_to_token
    if got == want and llama_stop == phicore_stop:
        ending = f"stopped at {name(llama_stop)!r}" if llama_stop is not None else \
            f"no stop token within {GREEDY_TOKENS} tokens"
        return f"llama.cpp: greedy answer equals phicore's ({len(got)} tokens, {ending})"
    at = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
    ours = want[at] if at < len(want) else phicore_stop
    theirs = got[at] if at < len(got) else llama_stop
    if ours == theirs:  # the same token, but only one side ends generation on it
        raise VerifyError(f"{shown}: llama.cpp {'ends' if theirs == llama_stop else 'does not end'} generation on "
                          f"{name(theirs)!r}, phicore {'does' if ours == phicore_stop else 'does not'}")
    with torch.no_grad():
        logits = ref.model(torch.tensor([prompt + want[:at]], device=ref.model.device))[0, -1].double().cpu()
    margin = float(logits[ours] - logits[theirs]) if ours is not None and theirs is not None else math.inf
    if margin > 2 * bound:
        raise VerifyError(f"{shown}: llama.cpp's greedy answer leaves phicore's at token {at} ({name(theirs)!r} "
                          f"instead of {name(ours)!r}, {margin:.3g} apart in phicore's logits)")
    return (f"llama.cpp: greedy answer equals phicore's for {at} tokens, then takes a near tie "
            f"({margin:.2g} apart in phicore's logits)")


def run_adapter_in_llama_cpp(path: Path, ref: Reference, base_type: str) -> list:
    if not llama_cpp_available():
        return [SKIPPED]
    from .gguf import write_gguf
    from .gguf_lora import base_only

    with tempfile.TemporaryDirectory(prefix="phicore-verify-") as tmp:
        base = Path(tmp) / "base.gguf"
        quiet: Callable[[str], None] = lambda message: None
        with base_only(ref.model):
            write_gguf(ref.model, ref.tokenizer, base, base_type, name="base",
                       warn=quiet)
        return run_in_llama_cpp(base, ref, weight_types={base_type.upper()}, lora_path=path)


if __name__ == "__main__":  # the llama.cpp child process of run_in_llama_cpp
    sys.exit(_probe_main(sys.argv[1]))
