"""What infer.py shows: answers streamed as they are generated, base-vs-fine-tuned comparisons
and the interactive chat loop.

Colours follow the seed's compare_models.py: the base model's answer in blue, the fine-tuned
one in green. They are used only when the output is a terminal and NO_COLOR is not set
(https://no-color.org), so piped output is plain text. A comparison prints the two answers
one under the other ("stacked", streamed) or in two columns ("side", printed when both are
complete). Both answers come from the same loaded weights: the base one with the adapter
switched off (`Session.generate(adapter=False)`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TextIO

from .inference import Answer, GenerationSettings, InferenceError, Session

BLUE, GREEN, BOLD, RESET = "\033[34m", "\033[32m", "\033[1m", "\033[0m"
BASE, TUNED = ("base", BLUE), ("fine-tuned", GREEN)  # label, colour
LAYOUTS = ("stacked", "side")
CHAT_HELP = "/reset clears the conversation, /quit ends (Ctrl-D too)"


def color_enabled(stream: TextIO) -> bool:
    """ANSI colours only on a terminal, and never with NO_COLOR set (to anything but "")."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty()) and not os.environ.get("NO_COLOR")


@dataclass
class Result:
    prompt: str
    tuned: Answer
    base: Optional[Answer] = None


def side_by_side(left: str, right: str, width: int, paint: Callable[[str, str], str]) -> str:
    """Two answers in two columns, wrapped to fit `width` characters, headed base | fine-tuned."""
    column = max(20, (width - 3) // 2)

    def wrap(text: str) -> list:
        lines = []
        for paragraph in text.split("\n"):
            lines += textwrap.wrap(paragraph, column) or [""]
        return lines

    left_lines, right_lines = [BASE[0]] + wrap(left), [TUNED[0]] + wrap(right)
    rows = []
    for i, (a, b) in enumerate(itertools.zip_longest(left_lines, right_lines, fillvalue="")):
        rows.append(paint(a.ljust(column), BLUE) + " | " + paint(b, GREEN))
        if i == 0:
            rows.append("-" * column + "-+-" + "-" * column)
    return "\n".join(row.rstrip() for row in rows)


class Console:
    """Prints answers of a Session to `out`: single prompts, batches, comparisons, chat."""

    def __init__(self, session: Session, settings: GenerationSettings, out: TextIO = sys.stdout, *,
                 compare: bool = False, layout: str = "stacked", stream: bool = True, system: Optional[str] = None,
                 batch_size: int = 8, width: Optional[int] = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}: use one of {', '.join(LAYOUTS)}")
        self.session, self.settings, self.out = session, settings, out
        self.compare, self.layout, self.stream, self.system = compare, layout, stream, system
        self.batch_size = max(1, batch_size)
        self.width = width or shutil.get_terminal_size((100, 24)).columns
        self.color = color_enabled(out)

    def paint(self, text: str, code: str) -> str:
        return f"{code}{text}{RESET}" if self.color and text else text

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    # ------------------------------------------------------------------ one prompt, streamed
    def _streamed(self, messages, adapter: bool, label: Optional[tuple]) -> Answer:
        """Generate one answer, writing it as it comes (in its colour when comparing)."""
        code = label[1] if label else ""
        if label:
            self._write(self.paint(f"[{label[0]}]", BOLD + code) + "\n")
        if self.color and code:
            self._write(code)
        answer = self.session.answer(messages, self.settings, adapter=adapter, system=self.system,
                                     on_text=self._write if self.stream else None)
        if not self.stream:
            self._write(answer.text)
        self._write((RESET if self.color and code else "") + "\n")
        return answer

    def answer(self, messages) -> Result:
        """One prompt or conversation: the tuned answer, and the base one first with --compare."""
        prompt = messages if isinstance(messages, str) else messages[-1]["content"]
        if self.compare and self.layout == "side":
            base = self.session.answer(messages, self.settings, adapter=False, system=self.system)
            tuned = self.session.answer(messages, self.settings, adapter=True, system=self.system)
            self._write(side_by_side(base.text, tuned.text, self.width, self.paint) + "\n")
            return Result(prompt, tuned, base)
        base = self._streamed(messages, False, BASE) if self.compare else None
        tuned = self._streamed(messages, True, TUNED if self.compare else None)
        return Result(prompt, tuned, base)

    # ------------------------------------------------------------------ many prompts, batched
    def answer_all(self, prompts: Sequence[str]) -> list:
        """Answer prompts in batches of `batch_size`, printing each batch when it is done."""
        results = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start:start + self.batch_size])
            ids = [self.session.prompt_ids(p, self.system) for p in chunk]
            bases = self.session.generate(ids, self.settings, adapter=False) if self.compare else [None] * len(chunk)
            tuned = self.session.generate(ids, self.settings, adapter=True)
            for prompt, base, answer in zip(chunk, bases, tuned):
                results.append(Result(prompt, answer, base))
                self._print_result(results[-1])
        return results

    def _print_result(self, result: Result) -> None:
        self._write(self.paint("> " + result.prompt, BOLD) + "\n")
        if result.base is None:
            self._write(result.tuned.text + "\n\n")
        elif self.layout == "side":
            self._write(side_by_side(result.base.text, result.tuned.text, self.width, self.paint) + "\n\n")
        else:
            for (name, code), answer in ((BASE, result.base), (TUNED, result.tuned)):
                self._write(self.paint(f"[{name}]", BOLD + code) + "\n" + self.paint(answer.text, code) + "\n")
            self._write("\n")

    # ------------------------------------------------------------------ chat
    def _fit_history(self, messages: list) -> list:
        """Drop the oldest exchanges until the prompt leaves room for the answer."""
        room = self.session.context_length - self.settings.max_new_tokens
        while len(messages) > 1 and len(self.session.prompt_ids(messages, self.system)) > room:
            messages = messages[2:] if len(messages) > 2 else messages[1:]
        return messages

    def chat(self, read: Optional[Callable[[str], str]] = None) -> int:
        """The interactive loop (line editing and history where readline exists); returns the
        number of turns answered."""
        if read is None:
            try:
                import readline  # noqa: F401  (gives input() editing and history)
            except ImportError:
                pass
            read = input
        session, turns = self.session, 0
        history: list = []
        mode = "multi-turn" if session.multi_turn else "each message answered on its own (the training format is single-turn)"
        self._write(f"chatting with {session.info.directory} on {session.info.base_model}: {mode}; {CHAT_HELP}\n")
        while True:
            try:
                line = read("you> ")
            except (EOFError, KeyboardInterrupt):
                self._write("\n")
                return turns
            command = line.strip()
            if not command:
                continue
            if command in ("/quit", "/exit", "/q"):
                return turns
            if command == "/reset":
                history.clear()
                self._write("(conversation cleared)\n")
                continue
            if command.startswith("/"):
                self._write(f"unknown command {command}: {CHAT_HELP}\n")
                continue
            user = {"role": "user", "content": line}
            messages = self._fit_history(history + [user]) if session.multi_turn else line
            try:
                result = self.answer(messages)
            except KeyboardInterrupt:
                self._write((RESET if self.color else "") + "\n(stopped)\n")
                continue
            except InferenceError as err:  # this message (not valid UTF-8, refused by the template): say so, go on
                self._write((RESET if self.color else "") + f"error: {err}\n")
                continue
            turns += 1
            if session.multi_turn:  # the fine-tuned answer continues the conversation
                history = messages + [{"role": "assistant", "content": result.tuned.text}]
