"""Turn conversations into role-tagged text: a list of `Segment(text, is_target)`.

A `PromptFormat` is the one place that decides how a model sees a conversation, so training
(`segments`) and inference (`format_prompt_for_generation`) agree character for character:
the generation prompt is exactly the training text up to where the first target starts.
Choose one with `prompt_format_for(tokenizer, template=None, default="instruct")`:

- `template=None` and a tokenizer with a chat template (Phi-3/3.5): `ChatTemplateFormat`, which
  renders with the tokenizer's own template. The targets are exactly each assistant content plus
  the end-of-turn marker that follows it (`<|end|>`), found by rendering prefixes: messages[:k]
  with `add_generation_prompt=True` is the text before assistant turn k. Whatever else the
  template writes (role tags, the final `<|endoftext|>` of Phi-3.5) is prompt. If the template
  writes no stop token after a reply, an EOS target is appended after the last one instead.
- `template=None` and no chat template (Phi-2): the `default` named format, "instruct":
  `Instruct: {prompt}\\nOutput: {response}` from the Phi-2 model card. A multi-turn chat dataset
  falls back to the same format for each exchange, joined by "\\n" (never an error); system
  text goes on its own line before the exchange it precedes; EOS follows the final response.
- `template="### Question: {prompt}\\n### Answer: {response}"`: a custom `TemplateFormat`.
  Placeholders: `{prompt}` (the user text, required), `{response}` (the assistant text,
  required, after `{prompt}`), `{system}` (optional; without it a system turn is written on its
  own line before the exchange). Text after `{response}` is part of the target (an end marker).
  Other braces are literal.
- `template="instruct"` or `"chat"` picks a named format explicitly.

Plain-text records (`Conversation.plain`, from `{text}`) are the text itself, all target, then EOS,
whatever the format. Spaces (not newlines) between the prompt and the reply belong to the target,
so the prompt ends at `Output:` and the reply starts with " ...": BPE tokenizers glue a leading
space to the next word, and the generation prompt ends exactly where training's prompt ends.
The EOS is a `Segment("", True, is_eos=True)`: the collator writes the tokenizer's EOS id there.
Trailing turns after the last assistant turn are ignored for training (there is nothing to learn).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Optional, Sequence, Union

from ..chat_template import ChatTemplateError, template_failure, template_source
from .formats import Conversation, Turn

INSTRUCT_TEMPLATE = "Instruct: {prompt}\nOutput: {response}"
NAMED_FORMATS = ("instruct", "chat")
_PLACEHOLDER = re.compile(r"\{(prompt|system)\}")


class Segment(NamedTuple):
    text: str
    is_target: bool
    is_eos: bool = False  # stands for the tokenizer's EOS token id; text is ""


EOS = Segment("", True, True)

Messages = Union[str, Sequence[Any]]  # a prompt string, or [{"role", "content"}] / [Turn]


def _as_turns(messages: Messages, system: Optional[str] = None) -> list[Turn]:
    if isinstance(messages, str):
        messages = [Turn("user", messages)]
    turns = [Turn("system", system)] if system else []
    for m in messages:
        turns.append(m if isinstance(m, Turn) else Turn(m["role"], m["content"]))
    return turns


def _split_trailing_spaces(text: str) -> tuple[str, str]:
    stripped = text.rstrip(" ")
    return stripped, text[len(stripped):]


class PromptFormat:
    """Base: plain records and the trimming shared by all formats."""

    name = "base"

    def segments(self, conv: Conversation) -> list[Segment]:
        """Training text for one conversation, as (text, is_target) segments ending in EOS."""
        if conv.plain:
            return [Segment("".join(t.content for t in conv.turns), True), EOS]
        turns = list(conv.turns)
        while turns and turns[-1].role != "assistant":
            turns.pop()
        if not turns:
            raise ValueError("conversation has no assistant turn (nothing to train on)")
        return self._segments(turns)

    def _segments(self, turns: list[Turn]) -> list[Segment]:
        raise NotImplementedError

    def format_prompt_for_generation(self, messages: Messages, system: Optional[str] = None) -> str:
        """The text up to where the model should start answering the last user turn."""
        raise NotImplementedError


class TemplateFormat(PromptFormat):
    """A `{prompt}` ... `{response}` template applied to each user/assistant exchange."""

    def __init__(self, template: str, name: str = "template", separator: str = "\n"):
        if "{prompt}" not in template or "{response}" not in template:
            raise ValueError(f"prompt template must contain {{prompt}} and {{response}}: {template!r}")
        head, _, tail = template.partition("{response}")
        if "{prompt}" not in head or "{prompt}" in tail or "{response}" in tail:
            raise ValueError(f"prompt template needs one {{prompt}} before one {{response}}: {template!r}")
        self.template, self.name, self.separator = template, name, separator
        self._head, self._tail = head, tail

    def _prompt_text(self, user: str, system: str) -> str:
        values = {"prompt": user, "system": system}
        text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self._head)
        if system and "{system}" not in self._head:
            text = f"{system}\n{text}"
        return text

    @staticmethod
    def _exchanges(turns: list[Turn]) -> list[tuple[str, str, Optional[str]]]:
        """(system, user, assistant or None) per exchange; consecutive turns of a role join by "\\n"."""
        out, system, user = [], [], []
        for t in turns:
            if t.role == "system":
                system.append(t.content)
            elif t.role == "user":
                user.append(t.content)
            else:
                out.append(("\n".join(system), "\n".join(user), t.content))
                system, user = [], []
        if system or user:
            out.append(("\n".join(system), "\n".join(user), None))
        return out

    def _render(self, turns: list[Turn]) -> list[Segment]:
        segs = []
        for i, (system, user, reply) in enumerate(self._exchanges(turns)):
            prompt, spaces = _split_trailing_spaces(self._prompt_text(user, system))
            segs.append(Segment((self.separator if i else "") + prompt, False))
            if reply is not None:
                segs.append(Segment(spaces + reply + self._tail, True))
        return segs

    def _segments(self, turns: list[Turn]) -> list[Segment]:
        return self._render(turns) + [EOS]

    def format_prompt_for_generation(self, messages: Messages, system: Optional[str] = None) -> str:
        turns = _as_turns(messages, system)
        if turns and turns[-1].role == "assistant":
            raise ValueError("the last message must be the user's (the model answers it)")
        return "".join(s.text for s in self._render(turns))


class ChatTemplateFormat(PromptFormat):
    """Render with the tokenizer's chat template; targets found by rendering prefixes.

    The template is tried once when the format is made (a user turn and an answer, and the
    generation prompt for a user turn), so a template that cannot work fails before any data is
    tokenised. Its failures are `ChatTemplateError`s (``ValueError``) naming the file the
    template came from (`phicore.chat_template.template_source`).
    """

    name = "chat"
    _PROBE = ({"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"})

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self._render(list(self._PROBE), add_generation_prompt=False)
        self._render(list(self._PROBE[:1]), add_generation_prompt=True)
        stop_ids = list(getattr(tokenizer, "stop_token_ids", None) or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
            stop_ids.append(tokenizer.eos_token_id)
        texts = {tokenizer.decode([i], skip_special_tokens=False) for i in stop_ids}
        # longest first, so "<|endoftext|>" is not shadowed by a shorter marker
        self.end_markers = sorted((t for t in texts if t.strip()), key=len, reverse=True)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as err:  # the template's own code failed: one line, naming the file it came from
            failure = template_failure(err)
            if failure is None:
                raise
            source = template_source(getattr(self.tokenizer, "name_or_path", None))
            raise ChatTemplateError(f"{source}: {failure}") from None

    def _segments(self, turns: list[Turn]) -> list[Segment]:
        messages = [{"role": t.role, "content": t.content} for t in turns]
        full = self._render(messages, add_generation_prompt=False)
        segs, cursor, marked = [], 0, False
        for k, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            prefix = self._render(messages[:k], add_generation_prompt=True)
            search_from = len(prefix) if full.startswith(prefix) and len(prefix) >= cursor else cursor
            start = full.find(turn.content, search_from)
            content = turn.content
            if start < 0 and turn.content.strip():  # templates may strip contents
                content = turn.content.strip()
                start = full.find(content, search_from)
            if start < 0:
                raise ValueError(f"assistant turn {k} not found in the chat template's rendering")
            end = start + len(content)
            while start > cursor and full[start - 1] == " ":
                start -= 1
            marker = next((m for m in self.end_markers if full.startswith(m, end)), "")
            marked = bool(marker)
            end += len(marker)
            segs += [Segment(full[cursor:start], False), Segment(full[start:end], True)]
            cursor = end
        segs.append(Segment(full[cursor:], False))
        if not marked:  # no stop token after the last reply: teach the model to stop with EOS
            segs.insert(len(segs) - 1, EOS)
        return [s for s in segs if s.text or s.is_eos]

    def format_prompt_for_generation(self, messages: Messages, system: Optional[str] = None) -> str:
        turns = _as_turns(messages, system)
        return self._render([{"role": t.role, "content": t.content} for t in turns],
                            add_generation_prompt=True)


def prompt_format_for(tokenizer, template: Optional[str] = None,
                      default: str = "instruct") -> PromptFormat:
    """The prompt format for a tokenizer: its chat template if any, else `default`.

    `template` overrides: "instruct", "chat", or a custom string with {prompt} and {response}.
    """
    choice = template or ("chat" if getattr(tokenizer, "chat_template", None) else default)
    if choice == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer with a chat template; this one "
                             "has none (use 'instruct' or a custom template)")
        return ChatTemplateFormat(tokenizer)
    if choice == "instruct":
        return TemplateFormat(INSTRUCT_TEMPLATE, name="instruct")
    if "{" in choice:
        return TemplateFormat(choice)
    raise ValueError(f"unknown prompt format {choice!r}: use one of {', '.join(NAMED_FORMATS)} "
                     "or a template string with {prompt} and {response}")
