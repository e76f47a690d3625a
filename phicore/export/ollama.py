"""Ollama: the merged model as a GGUF file plus a Modelfile (`infer.py --ollama DIR`).

    DIR/model.gguf   the merged model (phicore.export.gguf, --gguf-type)
    DIR/Modelfile    FROM ./model.gguf, TEMPLATE (the prompt format the adapter was trained
                     with, in Ollama's Go-template syntax), SYSTEM (--system), and a
                     PARAMETER stop for every stop token and stop string phicore stops on

so `ollama create NAME -f DIR/Modelfile` then `ollama run NAME` prompt the model exactly as
training did. The template is derived from phicore's own prompt format of the run
(`Session.prompt_format`), never typed in by hand:

- `{prompt}`/`{response}` formats (Phi-2's "Instruct: {prompt}\\nOutput: {response}", custom
  --template strings) from their parts: the text around {prompt}, the spaces that open the
  reply, the text after {response}, the separator between exchanges, where a system message
  goes ({system}, or its own line before the exchange).
- chat templates (Phi-3, Phi-3.5: Jinja) by rendering probe conversations with marker
  contents and reading off the text before and after each role's content, what opens the
  assistant's turn, and what the template writes first (the BOS text of Phi-3-mini-4k's).

Either way the result, `TurnText`, is checked by rendering a set of conversations (one turn,
several turns, with and without a system message) and comparing with phicore's own
rendering; a format that does not fit (a template that rewrites contents or numbers turns, say)
is refused with one line rather than written wrong.

The emitted TEMPLATE keeps to a small subset of Go's text/template, which Ollama executes with
`.Messages` (the conversation, `SYSTEM` prepended as a system message when the request has
none; consecutive messages of one role merged by Ollama with a blank line):

    {{- range $i, $m := .Messages }} ... {{- end }}      the messages in order
    {{- $last := eq (len (slice $.Messages $i)) 1 }}     whether this is the last one
    {{- if eq .Role "user" }} ... {{- else if ... }} ... {{- end }}
    {{ "literal text" }}  {{ .Content }}  {{ if not $last }}  {{ if and $last (ne .Role "assistant") }}
    {{- $system := "" }}  {{ $system = .Content }}  {{ $system }}   (formats with a {system} slot)
    {{ if .Content }}                                    (templates that skip an empty system message)

Conversations are expected to alternate user and assistant turns, system messages first in
their exchange (what phicore's formats and the checks above cover): Ollama merges consecutive
messages of one role with a blank line, where a {prompt} format joins them with a newline.

All literal text is written as Go string literals (escapes for newlines, quotes, backslashes
and unprintable characters), so the Modelfile parser, which keeps text between triple quotes
verbatim and drops unprintable characters, cannot change it; "{{-" only trims the layout
newlines between actions. A last assistant message is left open (Ollama continues it).

BOS: when the tokenizer adds BOS itself (`add_bos_token`, written into the GGUF), llama.cpp
adds it while tokenising the prompt, so a BOS text the chat template writes first is left out
of the TEMPLATE (`TurnText.runtime_bos`): the token ids are the same as phicore's.
"""

from __future__ import annotations

import os.path
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import ExportError
from .folders import building, check_new_folder

MODELFILE_NAME = "Modelfile"
GGUF_NAME = "model.gguf"
ROLES = ("system", "user", "assistant")
SYSTEM_SLOT = "\x00system"  # in TurnText.before/after: where a carried system message's text goes


# ----------------------------------------------------------------------------- the turn structure
@dataclass
class TurnText:
    """A prompt format as text around each message.

    A conversation renders as `start`, then for each message `before[role]` + content +
    `after[role]` (the assistant's `after` only when another message follows), then
    `generation` when the last message is not the assistant's. Roles missing from `before`
    are left out. `system_carried`: system text is not a message of its own but fills the
    SYSTEM_SLOT parts of the next user message's wrapper (a {system} placeholder).
    """

    start: str = ""
    before: dict = field(default_factory=dict)  # role -> tuple of str / SYSTEM_SLOT
    after: dict = field(default_factory=dict)
    generation: str = ""
    system_carried: bool = False
    skip_empty_system: bool = False
    runtime_bos: str = ""  # the BOS text at the start of `start` that the runtime adds as a token instead

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt text, as phicore renders it (BOS text included)."""
        out, system = [self.start], ""
        for i, message in enumerate(messages):
            role, content, last = message["role"], message["content"], i == len(messages) - 1
            if role == "system" and self.system_carried:
                system = content
                continue
            if role not in self.before or (role == "system" and self.skip_empty_system and not content):
                continue
            out += [_fill(self.before[role], system), content]
            if not (last and role == "assistant"):
                out.append(_fill(self.after[role], system))
            if role == "user":
                system = ""
        if messages and messages[-1]["role"] != "assistant":
            out.append(self.generation)
        return "".join(out)


def _fill(parts: tuple, system: str) -> str:
    return "".join(system if part == SYSTEM_SLOT else part for part in parts)


def _head_parts(text: str) -> tuple:
    """'System: {system}\\nQ: ' -> ('System: ', SYSTEM_SLOT, '\\nQ: '), empty strings left out."""
    parts = []
    for piece in re.split(r"(\{system\})", text):
        if piece == "{system}":
            parts.append(SYSTEM_SLOT)
        elif piece:
            parts.append(piece)
    return tuple(parts)


def _template_format_turns(prompt_format) -> TurnText:
    """TurnText of a `{prompt}`/`{response}` TemplateFormat (phicore.data.prompts), from its parts."""
    head, tail, separator = prompt_format._head, prompt_format._tail, prompt_format.separator
    before_prompt, _, after_prompt = head.partition("{prompt}")
    stripped = after_prompt.rstrip(" ")  # the prompt ends before these spaces; the reply starts with them
    spaces = after_prompt[len(stripped):]
    carried = "{system}" in head
    turns = TurnText(system_carried=carried)
    if not carried:  # a system message goes on its own line before its exchange (an empty one: nothing)
        turns.before["system"], turns.after["system"] = (), ("\n",)
        turns.skip_empty_system = True
    turns.before["user"], turns.after["user"] = _head_parts(before_prompt), _head_parts(stripped)
    turns.before["assistant"], turns.after["assistant"] = (spaces,) if spaces else (), (tail + separator,)
    return turns


# Probe contents: private-use characters, which no template writes on its own.
_MARK = ["\ue000" + name + "\ue001" for name in ("A", "B", "C", "S")]


def _chat_render(tokenizer, messages, generation: bool) -> str:
    from ..chat_template import render_chat_template

    return render_chat_template(tokenizer.chat_template, messages, add_generation_prompt=generation,
                                **tokenizer.special_tokens_map)


def _split(text: str, marks: Sequence[str], what: str) -> list:
    """text = p0 + marks[0] + p1 + ... ; returns [p0, p1, ...] or raises (a template that changes
    or drops a message's content)."""
    pieces, rest = [], text
    for mark in marks:
        before, found, rest = rest.partition(mark)
        if not found:
            raise _Unfit(f"the {what} probe's contents do not appear verbatim")
        pieces.append(before)
    return pieces + [rest]


class _Unfit(Exception):
    pass


def _natural_end(common: str, tokenizer) -> str:
    """The longest prefix of `common` that ends after a newline or a special token (a tidy place
    to end one message's text and start the next one's), else `common` itself."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) or [] if t]
    for k in range(len(common), 0, -1):
        prefix = common[:k]
        if prefix.endswith("\n") or any(prefix.endswith(t) for t in specials):
            return prefix
    return common


def _chat_template_turns(tokenizer) -> TurnText:
    """TurnText of a Jinja chat template, read off renderings of probe conversations."""
    A, B, _, S = _MARK
    user, assistant, system = {"role": "user", "content": A}, {"role": "assistant", "content": B}, \
        {"role": "system", "content": S}
    pre_n, post_n = _split(_chat_render(tokenizer, [user], False), [A], "user")
    pre_g, post_g = _split(_chat_render(tokenizer, [user], True), [A], "user")
    if pre_n != pre_g:
        raise _Unfit("the text before the first user message depends on add_generation_prompt")
    post_user = _natural_end(os.path.commonprefix([post_g, post_n]), tokenizer)
    generation, end = post_g[len(post_user):], post_n[len(post_user):]
    x0, x1, x2 = _split(_chat_render(tokenizer, [user, assistant], False), [A, B], "user/assistant")
    if not (x1.startswith(post_user) and x2.endswith(end)):
        raise _Unfit("the text between a user and an assistant message is not the user's closing text plus "
                     "the assistant's opening text")
    turns = TurnText(generation=generation)
    turns.before["user"], turns.after["user"] = (), (post_user,)
    turns.before["assistant"], turns.after["assistant"] = (x1[len(post_user):],), (x2[:len(x2) - len(end)],)
    try:  # what the template writes before any message: its rendering of no messages, less the end text
        empty = _chat_render(tokenizer, [], False)
        start = empty[:len(empty) - len(end)] if empty.endswith(end) else ""
    except Exception:  # noqa: BLE001 - a template that refuses an empty conversation
        start = ""
    turns.start = start if x0.startswith(start) else ""
    turns.before["user"] = (x0[len(turns.start):],) if x0[len(turns.start):] else ()
    try:
        with_system = _chat_render(tokenizer, [system, user], True)
    except Exception:  # noqa: BLE001 - a template that refuses system messages: Ollama's are left out
        with_system = None
    if with_system is not None and S in with_system:
        y0, y1, _ = _split(with_system, [S, A], "system/user")
        pre_user = "".join(turns.before["user"])
        if not (y0.startswith(turns.start) and y1.endswith(pre_user)):
            raise _Unfit("the system message's text does not sit between the start and the user's opening text")
        turns.before["system"] = (y0[len(turns.start):],)
        turns.after["system"] = (y1[:len(y1) - len(pre_user)],)
        try:
            empty_system = _chat_render(tokenizer, [{"role": "system", "content": ""}, user], True)
        except Exception:  # noqa: BLE001
            empty_system = None
        turns.skip_empty_system = empty_system == _chat_render(tokenizer, [user], True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and getattr(tokenizer, "add_bos_token", False) and turns.start.startswith(bos):
        turns.runtime_bos = bos
    return turns


# Conversations every derived TurnText must render exactly as phicore does.
_SYSTEM_TEXT = "You are a terse assistant. Answer in one line."
_EXCHANGES = [("What is 2 + 2?", "4."), ("And 3 + 3?\nShow the sum.", "6, as 3 + 3 = 6."),
              ("Thanks! One more: 10 - 7?", "3.")]


def probe_conversations() -> list:
    """(messages, system) pairs: one turn, several turns, with and without a system message."""
    out = []
    for turns in (1, 2, 3):
        messages = []
        for user, reply in _EXCHANGES[:turns - 1]:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": _EXCHANGES[turns - 1][0]})
        out += [(messages, None), (messages, _SYSTEM_TEXT)]
    return out


def turn_text(prompt_format, tokenizer) -> TurnText:
    """The TurnText of phicore's prompt format, checked against its rendering of
    `probe_conversations()`; ExportError (one line) when the format does not fit."""
    from ..data.prompts import ChatTemplateFormat, TemplateFormat

    try:
        if isinstance(prompt_format, TemplateFormat):
            turns = _template_format_turns(prompt_format)
        elif isinstance(prompt_format, ChatTemplateFormat):
            turns = _chat_template_turns(tokenizer)
        else:
            raise _Unfit(f"no Ollama translation for prompt format {type(prompt_format).__name__}")
    except _Unfit as err:
        raise ExportError(f"--ollama: prompt format {prompt_format.name!r} cannot be written as an Ollama "
                          f"template: {err}") from None
    for messages, system in probe_conversations():
        expected = prompt_format.format_prompt_for_generation(messages, system=system)
        with_system = ([{"role": "system", "content": system}] if system else []) + messages
        if turns.render(with_system) != expected:
            roles = ", ".join(m["role"] for m in with_system)
            raise ExportError(f"--ollama: prompt format {prompt_format.name!r} cannot be written as an Ollama "
                              f"template: a conversation of [{roles}] would not render as phicore renders it "
                              "(the template changes contents or depends on more than each message's role)")
    return turns


# ----------------------------------------------------------------------------- Go template text
def go_string(text: str) -> str:
    """A Go interpreted string literal for `text` (printable ASCII and printable non-ASCII as
    they are; quotes, backslashes, newlines, tabs and unprintable characters escaped)."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = []
    for ch in text:
        if ch in escapes:
            out.append(escapes[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _go_parts(parts: tuple) -> str:
    return "".join("{{ $system }}" if p == SYSTEM_SLOT else "{{ " + go_string(p) + " }}" for p in parts if p)


def go_template(turns: TurnText) -> str:
    """Ollama TEMPLATE text (Go text/template, the subset in the module docstring)."""
    lines = []
    start = turns.start[len(turns.runtime_bos):]
    if start:
        lines.append("{{- " + go_string(start) + " }}")
    if turns.system_carried:
        lines.append('{{- $system := "" }}')
    lines.append("{{- range $i, $m := .Messages }}")
    lines.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    branches = []
    if turns.system_carried:
        branches.append(("system", "{{ $system = .Content }}"))
    for role in ROLES:
        if role not in turns.before:
            continue
        closing = _go_parts(turns.after[role])
        if role == "assistant" and closing:
            closing = "{{ if not $last }}" + closing + "{{ end }}"
        body = _go_parts(turns.before[role]) + "{{ .Content }}" + closing
        if role == "user" and turns.system_carried:
            body += '{{ $system = "" }}'
        if role == "system" and turns.skip_empty_system:
            body = "{{ if .Content }}" + body + "{{ end }}"
        branches.append((role, body))
    for k, (role, body) in enumerate(branches):
        lines.append("{{- " + ("if" if k == 0 else "else if") + f' eq .Role "{role}" }}}}' + body)
    if branches:
        lines.append("{{- end }}")
    if turns.generation:
        lines.append('{{- if and $last (ne .Role "assistant") }}' + "{{ " + go_string(turns.generation) + " }}"
                     + "{{ end }}")
    lines.append("{{- end }}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the Modelfile
def stop_strings(tokenizer, stop_ids: Sequence[int], text_stops: Sequence[str]) -> list:
    """Every stop phicore's generation uses, as text: the stop tokens' texts, then the text stops."""
    out = []
    for token_id in stop_ids:
        text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
        if text.strip() and text not in out:
            out.append(text)
    for text in text_stops:
        if text and text not in out:
            out.append(text)
    return out


def _modelfile_value(text: str, what: str) -> str:
    """A Modelfile argument: bare when it is one plain word, else between triple quotes (kept
    verbatim by Ollama's parser: no escapes, unprintable characters other than newlines and
    tabs dropped, and a \"\"\" inside would end it)."""
    bad = next((ch for ch in text if not (ch.isprintable() or ch in "\n\t\r")), None)
    if bad is not None:
        raise ExportError(f"--ollama: {what} contains the character U+{ord(bad):04X}, which a Modelfile cannot hold")
    if '"""' in text:
        raise ExportError(f'--ollama: {what} contains """, which a Modelfile cannot hold')
    if text and not any(ch.isspace() or ch in "\"#" for ch in text):
        return text
    return '"""' + text + '"""'


def modelfile(template: str, stops: Sequence[str], *, system: Optional[str] = None, gguf_name: str = GGUF_NAME,
              comment: Sequence[str] = ()) -> str:
    """The Modelfile text."""
    lines = [f"# {line}" for line in comment]
    lines.append(f"FROM ./{gguf_name}")
    lines.append(f"TEMPLATE {_modelfile_value(template, 'the template')}")
    if system:
        lines.append(f"SYSTEM {_modelfile_value(system, '--system')}")
    for stop in stops:
        lines.append(f"PARAMETER stop {_modelfile_value(stop, f'the stop string {stop!r}')}")
    return "\n".join(lines) + "\n"


def write_ollama(session, directory, *, write_model: Callable[[Path], object], system: Optional[str] = None) -> Path:
    """DIR/Modelfile and DIR/model.gguf (written by `write_model(path)`) for an inference Session
    (phicore.inference) whose model is merged. The Modelfile is worked out first: a prompt
    format Ollama cannot express is refused before the GGUF is written."""
    directory = check_new_folder(directory, "--ollama")
    turns = turn_text(session.prompt_format, session.tokenizer)
    stops = stop_strings(session.tokenizer, session.stop_ids, session.text_stops)
    text = modelfile(go_template(turns), stops, system=system, comment=[
        f"Ollama Modelfile written by phicore (infer.py --ollama) for the adapter {session.info.directory.name} "
        f"on {Path(session.info.base_model).name}, prompt format {session.prompt_format.name!r}.",
        f"In this folder: ollama create NAME -f {MODELFILE_NAME}, then ollama run NAME"])
    with building(directory) as partial:
        write_model(partial / GGUF_NAME)
        (partial / MODELFILE_NAME).write_text(text, encoding="utf-8")
    return directory
