"""Answer prompts with a trained adapter: read the adapter folder, load its base, apply it.

A training run's folder (train.py --out) holds the PEFT adapter files, the tokenizer files and
`training_config.json`, phicore's record of the base model, the prompt template and the
quantisation the adapter was trained with. `load_session(folder)` turns that into a `Session`:
the base loaded once (NF4 again for a QLoRA adapter, as training saw it), the adapter applied,
and the same `PromptFormat` training used, so a prompt becomes exactly the token ids a training
example's prompt part became (`format_prompt_for_generation` + `encode_prompt`).

`Session.generate` answers a batch of prompts with the adapter on, or off (`adapter=False`,
the base alone: the same weights, no second copy). Generation stops on the tokenizer's stop
tokens and, for `{prompt}`/`{response}` templates, on text: a Phi-2 model trained on
"Instruct: ...\\nOutput: ..." tends to go on with a new "\\nInstruct:" turn, which is cut off.

`AnswerDecoder` turns token ids into answer text one token at a time for streaming. It only
hands out text that can no longer change (an incomplete UTF-8 character, a possible start of a
text stop, trailing spaces are held back), so the streamed pieces join up to exactly the text
decoded from the finished ids.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .data import ChatTemplateFormat, PromptFormat, encode_prompt, prompt_format_for
from .generate import generate
from .lora import disable_adapter
from .peft_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from .peft_io import read_adapter_config, read_adapter_tensors  # check adapter_config.json / the tensors
from .record import RecordError, RunRecord
from .settings import check, setting
from .tokenizer import TOKENIZER_FILE, check_vocab_fits, load_tokenizer
from .weights import default_device, load_model, parse_dtype

TextCallback = Callable[[int, str], None]  # (row, new text)


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


class InferenceError(ValueError):
    """Bad input (adapter folder, base model, flags): one line for the user, CLI exit 2."""


def check_text(text: str, what: str) -> str:
    """`text` unchanged if it can be encoded as UTF-8; else InferenceError naming `what`. Bytes
    that are not UTF-8 reach Python as lone surrogates (a shell argument or stdin decoded with
    surrogateescape: byte 0xE9 becomes U+DCE9), and so does a JSON "\\ud800" escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(text[err.start])
        found = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"a lone surrogate U+{char:04X}"
        raise InferenceError(f"{what}: not valid UTF-8 ({found} at character {err.start})") from None
    return text


def _one_line(err: BaseException) -> str:
    """The exception's first line; its type name where that says more (a jinja2 error's text
    alone can be a bare message)."""
    text = (str(err).strip().splitlines() or [""])[0]
    return text if isinstance(err, ValueError) and text else f"{type(err).__name__}: {text}"


def _template_errors() -> tuple:
    """What rendering a prompt format raises for a bad template or conversation: ValueError
    (phicore's ChatTemplateError included) and jinja2's TemplateError (its sandbox's
    SecurityError included) when jinja2 is installed. Evaluated only when an exception is
    being handled."""
    try:
        from jinja2.exceptions import TemplateError
    except ImportError:
        return (ValueError,)
    return (ValueError, TemplateError)


# ----------------------------------------------------------------------------- the adapter folder
@dataclass
class AdapterInfo:
    """What an adapter folder says about how to use it."""

    directory: Path
    base_model: str  # folder or hub id, resolved as far as the local disk allows
    adapter_config: dict = field(repr=False)  # adapter_config.json, read and checked once
    record: Optional[RunRecord] = field(default=None, repr=False)  # training_config.json, if there is one
    record_path: Optional[Path] = None

    @property
    def prompt_template(self) -> Optional[str]:
        """"chat", "instruct", a custom template, or None (the tokenizer's default)."""
        return self.record.prompt_template if self.record else None

    @property
    def quantization(self) -> Optional[dict]:
        """{"type": "nf4", "double_quant": bool, "compute_dtype": str}, or None."""
        return self.record.quantization if self.record else None

    @property
    def quantized(self) -> bool:
        return bool(self.record and self.record.quantized)


def _resolve_base(recorded: str, adapter_dir: Path) -> str:
    """A recorded base path is relative to where training ran; try it as given, then next to
    the adapter (a tiny preset's OUT/base), else leave it to the hub (an id like microsoft/phi-2)."""
    path = Path(recorded).expanduser()
    candidates = [path] if path.is_absolute() else [path, adapter_dir / path, adapter_dir.parent / path]
    candidates.append(adapter_dir / path.name)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return str(candidate)
    return recorded


def read_adapter_info(directory, base: Optional[str] = None) -> AdapterInfo:
    """Check that `directory` is an adapter folder and read its run record.

    The record (training_config.json) is looked for in the folder and, for a checkpoint folder
    such as OUT/best or OUT/checkpoint-40, in its parent. Without one, the base comes from
    adapter_config.json's base_model_name_or_path and the prompt format from the tokenizer.
    """
    directory = Path(directory)
    if not directory.exists():
        raise InferenceError(f"{directory}: no such adapter folder")
    if not directory.is_dir():
        raise InferenceError(f"{directory}: not a folder (--adapter takes train.py's --out folder)")
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / n).is_file()]
        raise InferenceError(f"{directory}: not an adapter folder (no {' or '.join(missing)}); "
                             "--adapter takes train.py's --out folder")
    try:  # adapter_config.json as PEFT writes it, with only what phicore implements
        adapter_config = read_adapter_config(directory)
    except ValueError as err:
        raise InferenceError(str(err)) from None
    record_path = RunRecord.find(directory)
    try:
        record = RunRecord.read(record_path) if record_path else None
    except RecordError as err:
        raise InferenceError(str(err)) from None
    recorded = record.base_model if record else adapter_config.get("base_model_name_or_path")
    if base is None and not recorded:
        raise InferenceError(f"{directory}: no base model recorded (training_config.json or {CONFIG_NAME}); "
                             "pass --base")
    record_dir = record_path.parent if record_path else directory
    return AdapterInfo(
        directory=directory,
        base_model=base if base is not None else _resolve_base(str(recorded), record_dir),
        adapter_config=adapter_config,
        record=record,
        record_path=record_path,
    )


# ----------------------------------------------------------------------------- decoding
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class AnswerDecoder:
    """Token ids -> answer text, incrementally, with text stops.

    `add(id)` returns the text that became final with this token ("" while held back);
    `finish()` returns the rest. Joined, the pieces equal `text`: the decoded ids (special
    tokens skipped) cut at the first text stop, without leading and trailing whitespace.
    """

    def __init__(self, tokenizer, text_stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.text_stops = [s for s in text_stops if s]
        self.ids: list = []
        self.stopped = False  # a text stop was generated: the answer is complete
        self._emitted = ""

    def _visible(self, ids: Optional[list] = None) -> str:
        text = self.tokenizer.decode(self.ids if ids is None else ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.text_stops) if i >= 0]
        if cuts:
            text, self.stopped = text[: min(cuts)], True
        return text.lstrip()

    @property
    def text(self) -> str:
        return self._visible().rstrip()

    def _settled(self, text: str) -> str:
        """The part of a still-growing text that no later token can change."""
        text = text.rstrip("\ufffd")  # a multi-byte character cut in the middle
        held = 0
        for stop in self.text_stops:  # the longest end that could still become a text stop
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return text[: len(text) - held].rstrip()

    def _emit(self, text: str) -> str:
        if not text.startswith(self._emitted):  # decoding revised earlier text: wait for it to settle
            return ""
        new, self._emitted = text[len(self._emitted):], text
        return new

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self._visible()
        if self.stopped:
            return self._emit(text.rstrip())
        run = self._byte_run()
        if run:  # byte-fallback pieces decode as one run: invalid UTF-8 turns all of it into "\ufffd"s,
            text = self._visible(self.ids[:-run])  # so what they decode to is settled once the run ends
        return self._emit(self._settled(text))

    def _byte_run(self) -> int:
        """How many of the last ids are byte-fallback pieces (<0x41>): 0 for byte-level BPEs."""
        n = 0
        while n < len(self.ids) and _BYTE_PIECE.fullmatch(self.tokenizer.id_to_token(self.ids[-1 - n]) or ""):
            n += 1
        return n

    def finish(self) -> str:
        return self._emit(self.text)


def text_stops_for(prompt_format: PromptFormat) -> list:
    """Text that starts a new user turn in a `{prompt}`/`{response}` template ("\\nInstruct:"
    for Phi-2's format): the model has finished its answer when it writes it."""
    template = getattr(prompt_format, "template", None)
    if not template:
        return []
    opening = re.split(r"\{(?:prompt|system)\}", template, maxsplit=1)[0].strip()
    return [getattr(prompt_format, "separator", "\n") + opening] if opening else []


# ----------------------------------------------------------------------------- the session
@dataclass
class GenerationSettings:
    """How answers are sampled; declared once (phicore.settings), checked when built."""

    max_new_tokens: int = setting(256, "most tokens per answer", section="generation", range="[1, inf)")
    temperature: float = setting(0.0, "sampling temperature; 0 = greedy (deterministic)", section="generation",
                                 range="[0, inf)")
    top_p: float = setting(1.0, "nucleus sampling mass (1 = off)", section="generation", range="(0, 1]")
    top_k: int = setting(0, "sample among the k likeliest tokens (0 = off)", section="generation", range="[0, inf)")
    repetition_penalty: float = setting(1.0, "penalise tokens already in the text (1 = off)", section="generation",
                                        range="(0, inf)")
    seed: Optional[int] = setting(None, "sampling seed", section="generation", range="[0, 4294967296)")

    def __post_init__(self):
        check(self)


@dataclass
class Answer:
    token_ids: list  # generated ids, up to (not including) a stop token
    text: str


class _AllStopped(Exception):
    """Raised from the streaming callback to end generation once every row hit a text stop."""


@dataclass
class Session:
    """A base model with an adapter applied, its tokenizer and the training prompt format."""

    model: torch.nn.Module
    tokenizer: object
    prompt_format: PromptFormat
    info: AdapterInfo
    stop_ids: list
    text_stops: list
    warn: Callable[[str], None] = field(default=_warn, repr=False)

    @property
    def multi_turn(self) -> bool:
        """Chat-template models see the whole conversation; template formats one exchange."""
        return isinstance(self.prompt_format, ChatTemplateFormat)

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def prompt_text(self, messages, system: Optional[str] = None) -> str:
        """A prompt string or [{"role", "content"}] messages -> the text training's prompts had.
        InferenceError for text that is not valid UTF-8 or a template that fails on it."""
        texts = [messages] if isinstance(messages, str) else [m.get("content") for m in messages]
        for what, text in [("prompt", t) for t in texts] + [("--system", system)]:
            if isinstance(text, str):
                check_text(text, what)
        try:
            return self.prompt_format.format_prompt_for_generation(messages, system=system)
        except _template_errors() as err:
            raise InferenceError(f"prompt format {self.prompt_format.name!r} of {self.info.directory} failed: "
                                 f"{_one_line(err)}") from None

    def prompt_ids(self, messages, system: Optional[str] = None) -> list:
        return encode_prompt(self.tokenizer, self.prompt_text(messages, system))

    def _fit(self, ids: list, max_new_tokens: int) -> list:
        room = self.context_length - max_new_tokens
        if room < 1:
            raise InferenceError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's "
                                 f"{self.context_length}-token context")
        if len(ids) > room:
            self.warn(f"warning: prompt of {len(ids)} tokens cut to its last {room} to fit the context")
            return ids[-room:]
        return ids

    def generate(self, prompts: Sequence[Sequence[int]], settings: GenerationSettings, *, adapter: bool = True,
                 on_text: Optional[TextCallback] = None) -> list:
        """Answer a batch of prompt id lists; `on_text(row, piece)` receives text as it is settled."""
        prompts = [self._fit(list(p), settings.max_new_tokens) for p in prompts]
        decoders = [AnswerDecoder(self.tokenizer, self.text_stops) for _ in prompts]
        done = [False] * len(prompts)

        def step(tokens):
            for row, token in enumerate(tokens):
                if done[row]:
                    continue
                if token is None:  # a stop token: generate leaves it out of the answer
                    done[row] = True
                    continue
                piece = decoders[row].add(token)
                if piece and on_text is not None:
                    on_text(row, piece)
                done[row] = decoders[row].stopped
            if all(done):
                raise _AllStopped

        kwargs = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                      top_p=settings.top_p, top_k=settings.top_k, repetition_penalty=settings.repetition_penalty,
                      seed=settings.seed, stop_ids=self.stop_ids, pad_id=self.tokenizer.pad_token_id, stream=step)
        try:
            if adapter:
                generate(self.model, prompts, **kwargs)
            else:
                with disable_adapter(self.model):
                    generate(self.model, prompts, **kwargs)
        except _AllStopped:
            pass
        answers = []
        for row, decoder in enumerate(decoders):
            rest = decoder.finish()
            if rest and on_text is not None:
                on_text(row, rest)
            answers.append(Answer(decoder.ids, decoder.text))
        return answers

    def answer(self, messages, settings: GenerationSettings, *, adapter: bool = True, system: Optional[str] = None,
               on_text: Optional[Callable[[str], None]] = None) -> Answer:
        """One prompt (or conversation) -> its answer, streamed to `on_text(piece)` if given."""
        callback = None if on_text is None else (lambda row, piece: on_text(piece))
        return self.generate([self.prompt_ids(messages, system)], settings, adapter=adapter, on_text=callback)[0]


def load_session(adapter_dir, *, base: Optional[str] = None, device=None, dtype=None, quantize: Optional[str] = None,
                 dense: bool = False, warn: Optional[Callable[[str], None]] = None) -> Session:
    """Load the base recorded in the adapter folder (or `base`), apply the adapter, and pick the
    training prompt format.

    quantize: "nf4" loads the base in 4-bit even if the adapter was trained on a dense one;
        by default a QLoRA adapter's base is loaded NF4 as in training (with its double_quant).
    dense: after loading an NF4 base, replace it by its dequantised weights in the compute
        dtype (the same numbers training saw; needed to merge or export).
    """
    info = read_adapter_info(adapter_dir, base)
    try:  # the adapter's own files first: they are small, and a broken one needs no base to find out
        tensors = read_adapter_tensors(info.directory)
    except (FileNotFoundError, ValueError) as err:
        raise InferenceError(str(err)) from None
    try:
        device = torch.device(device) if device else default_device()
        dtype = parse_dtype(dtype)
    except (RuntimeError, ValueError) as err:
        raise InferenceError(f"--device/--dtype: {err}") from None
    if quantize not in (None, "nf4"):
        raise InferenceError(f"--quantize {quantize!r} is not supported (nf4)")
    recorded = info.quantization or {}
    quantize = quantize or (recorded.get("type") if info.quantized else None)
    own_tokenizer = (info.directory / TOKENIZER_FILE).is_file()
    try:
        tokenizer = load_tokenizer(info.directory if own_tokenizer else info.base_model)
    except (FileNotFoundError, ValueError) as err:
        raise InferenceError(f"{err}" if own_tokenizer else f"base model of {info.directory}: {err} "
                             "(--base chooses another)") from None
    try:
        model = load_model(info.base_model, dtype=dtype, device=device, quantize=quantize,
                           double_quant=bool(recorded.get("double_quant", True)))
        check_vocab_fits(tokenizer, model.config.vocab_size, f"the vocab_size of the base {info.base_model}")
    except (FileNotFoundError, ValueError) as err:
        raise InferenceError(f"base model of {info.directory}: {err} (--base chooses another)") from None
    if dense:
        from .export.merge import dequantize_nf4_layers

        dequantize_nf4_layers(model)
    try:
        load_adapter(model, info.directory, dtype=torch.float32, config=info.adapter_config, tensors=tensors)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise InferenceError(f"adapter does not fit the base {info.base_model}: {err}") from None
    model.eval()
    try:
        prompt_format = prompt_format_for(tokenizer, template=info.prompt_template)
    except _template_errors() as err:
        raise InferenceError(f"{info.record_path or info.directory}: prompt format: {_one_line(err)}") from None
    stop_ids = sorted(set(tokenizer.stop_token_ids) | set(model.config.eos_token_ids))
    session = Session(model, tokenizer, prompt_format, info, stop_ids, text_stops_for(prompt_format))
    if warn is not None:
        session.warn = warn
    return session


# ----------------------------------------------------------------------------- prompt files
def read_prompts(path, stdin=None) -> list:
    """Prompts from a file ("-" for stdin): JSONL with a "prompt" field per line (a .jsonl file,
    or any file whose first line is a JSON object), else one prompt per non-empty line."""
    name = "<stdin>" if str(path) == "-" else str(path)
    try:
        text = (stdin or sys.stdin).read() if str(path) == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InferenceError(f"{name}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InferenceError(f"{name}: cannot read ({err})") from None
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    as_jsonl = name.endswith(".jsonl") or first.startswith("{")
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        check_text(line, f"{name}:{number}")
        if not as_jsonl:
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InferenceError(f"{name}:{number}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise InferenceError(f"{name}:{number}: JSON nested too deeply") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise InferenceError(f"{name}:{number}: expected an object with a non-empty string \"prompt\"")
        prompts.append(check_text(prompt, f"{name}:{number}"))
    if not prompts:
        raise InferenceError(f"{name}: no prompts")
    return prompts
