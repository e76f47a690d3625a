"""Rendering a Hugging Face chat template: the Jinja sandbox transformers renders them in.

A model folder's chat template is Jinja source written for transformers' environment, so it is
rendered the same way here: a sandboxed (immutable) environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` tag that just renders
its body, ``raise_exception(message)`` (raises ``jinja2.exceptions.TemplateError``, the template's
way of rejecting a conversation), a ``tojson`` filter that writes plain JSON (Jinja's own escapes
HTML characters) and ``strftime_now(format)``. `phicore.tokenizer.Tokenizer.apply_chat_template`
passes the special tokens (``bos_token``, ``eos_token``, ...) as variables.

jinja2 is imported when a template is first compiled, not with this module: only chat models
render templates, and most runs (Phi-2, plain prompt formats, inference) never do.

A template is code from the model folder, so rendering is bounded and its failures are one
line: the output is capped at `render_limit` characters (1 Mi plus 4 times the text the
template is given: a template writes each message once plus its tags), checked while it
renders, and the sandbox's ``*``, ``**`` and ``+`` refuse results over the same cap, so a loop
or a repeated string stops early instead of filling memory (`ChatTemplateError`, a
``ValueError``). A template that does not compile, is refused by the sandbox
(``SecurityError``), calls ``raise_exception`` or fails otherwise (an undefined name, a
``TypeError``) raises what transformers raises; `template_failure` turns those into one line
and `template_source(folder)` names the file a folder's template came from
(`phicore.data.prompts.ChatTemplateFormat` uses both).
"""

from __future__ import annotations

import contextvars
import functools
import json
import operator
import re
import types
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

RENDER_BASE_CHARS = 1 << 20  # a rendering may be this long whatever its inputs ...
RENDER_INPUT_FACTOR = 4  # ... plus this many times the characters of text it is given
MAX_POWER_BITS = 1 << 16  # `a ** b` in a template: results up to this many bits

class ChatTemplateError(ValueError):
    """A chat template that does not compile, is refused by the sandbox, fails or renders too
    much: one line, "chat template ...: what went wrong"."""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _text_chars(value: Any) -> int:
    """Characters of text in the messages/tools/documents (strings anywhere inside), iteratively."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def render_limit(*inputs: Any) -> int:
    """The most characters a rendering of these inputs may have (see the module docstring)."""
    return RENDER_BASE_CHARS + RENDER_INPUT_FACTOR * sum(_text_chars(x) for x in inputs)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """Render a Jinja chat template the way transformers does.

    Message keys whose value is None are dropped (templates handle a missing key, not a None).
    Raises what the template raises, as transformers does (jinja2's errors, a ``TypeError``...;
    `template_failure` says which are the template's), and `ChatTemplateError` when it renders
    more than `render_limit` characters.
    """
    conversation = [{key: value for key, value in dict(m).items() if value is not None} for m in messages]
    compiled = _compile_chat_template(template)
    limit = render_limit(conversation, tools, documents, variables)
    token = _BUDGET.set(_Budget(limit))
    pieces, size = [], 0
    try:
        for piece in compiled.generate(
            messages=conversation,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        ):
            size += len(piece)
            if size > limit:
                raise _too_long(limit)
            pieces.append(piece)
    finally:
        _BUDGET.reset(token)
    return "".join(pieces)


def _too_long(limit: int) -> ChatTemplateError:
    return ChatTemplateError(f"chat template renders more than {limit:,} characters (the cap: "
                             f"{RENDER_BASE_CHARS:,} plus {RENDER_INPUT_FACTOR} times the conversation's text); "
                             "a runaway loop or repeat in the template?")


def template_failure(err: BaseException) -> str | None:
    """One line for an error a chat template's own code raised while compiling or rendering
    ("chat template refused by the sandbox: ..."); None for anything else (a bug here)."""
    from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError

    if isinstance(err, ChatTemplateError):
        return str(err)
    if isinstance(err, SecurityError):
        return f"chat template refused by the sandbox: {_one_line(err)}"
    if isinstance(err, TemplateSyntaxError):
        return f"chat template does not compile: {_one_line(err)} (template line {err.lineno})"
    if isinstance(err, (TemplateError, TypeError, ValueError, LookupError, ArithmeticError, AttributeError,
                        RecursionError)):  # what expressions in a template raise
        return f"chat template failed: {_one_line(err)}"
    return None


def template_source(folder: str | Path | None) -> str:
    """The file a tokenizer folder's chat template is read from (phicore.tokenizer_files'
    order: chat_template.jinja, then chat_template.json's "chat_template", then
    tokenizer_config.json), for error messages; "the chat template" without a folder."""
    from .tokenizer_files import CHAT_TEMPLATE_JINJA_FILE, CHAT_TEMPLATE_JSON_FILE, TOKENIZER_CONFIG_FILE

    if not folder or not Path(folder).is_dir():
        return "the chat template"
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE_JINJA_FILE).is_file():
        return str(folder / CHAT_TEMPLATE_JINJA_FILE)
    try:
        in_json = json.loads((folder / CHAT_TEMPLATE_JSON_FILE).read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        in_json = None
    return str(folder / (CHAT_TEMPLATE_JSON_FILE if in_json is not None else TOKENIZER_CONFIG_FILE))


class _Budget:
    """One rendering's bounds: `limit` characters for any value or the output, and the range()
    items its loops may still take (nested loops of range(100000) stop at `limit` items)."""

    def __init__(self, limit: int):
        self.limit = self.range_items = limit


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget",
                                                                   default=_Budget(RENDER_BASE_CHARS))


def _checked(value: Any) -> Any:
    """`value`, unless it is a string or container over the rendering's cap."""
    limit = _BUDGET.get().limit
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > limit:
        raise _too_long(limit)
    return value


def _check_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """A call's integer arguments: a width or count over the cap (`center(10**9)`) is refused
    before the call builds its result."""
    limit = _BUDGET.get().limit
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and abs(value) > limit:
            raise ChatTemplateError(f"chat template calls with an argument of {value} (over the cap of {limit:,})")


_NUMBER = re.compile(r"\d{7,}")


def _check_format_string(text: Any) -> None:
    """A printf or str.format string whose width or precision is over the cap (`'%1000000000d'`)
    is refused before it is applied."""
    if isinstance(text, str):
        limit = _BUDGET.get().limit
        for number in _NUMBER.findall(text):
            if int(number) > limit:
                raise ChatTemplateError(f"chat template formats with a width of {number} (over the cap of {limit:,})")


def _bounded_binop(op: str, left: Any, right: Any) -> Any:
    """`*`, `**`, `+` and `%` in a template: a result over the cap is refused before it is built
    where its size is known (a string repeated a billion times, 2 ** 10**9), else just after."""
    limit = _BUDGET.get().limit
    if op == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > limit:
                raise _too_long(limit)
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 \
                and right * abs(left).bit_length() > MAX_POWER_BITS:
            raise ChatTemplateError(f"chat template computes a power of more than {MAX_POWER_BITS} bits "
                                    f"({left} ** {right})")
    elif op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        if len(left) + len(right) > limit:
            raise _too_long(limit)
    elif op == "%":
        _check_format_string(left)
        _check_arguments(right if isinstance(right, tuple) else (right,), {})
    return _checked(_BINOPS[op](left, right))


_BINOPS = {"*": operator.mul, "**": operator.pow, "+": operator.add, "%": operator.mod}


def _bounded_join(parts) -> str:
    """`"".join` for the captured output of `{% set %}` blocks and macros, within the cap."""
    limit, size, pieces = _BUDGET.get().limit, 0, []
    for piece in parts:
        size += len(piece)
        if size > limit:
            raise _too_long(limit)
        pieces.append(piece)
    return "".join(pieces)


def _bounded_range(*args: int) -> range:
    """The sandbox's range(), its items charged to the rendering's budget."""
    from jinja2.sandbox import safe_range

    items = safe_range(*args)
    budget = _BUDGET.get()
    budget.range_items -= len(items)
    if budget.range_items < 0:
        raise ChatTemplateError(f"chat template loops over more than {budget.limit:,} range() items in one "
                                "rendering; a runaway loop in the template?")
    return items


def _bounded_filter(name: str, function):
    """A filter whose integer arguments and result are held to the cap (jinja's pass_* marks kept)."""
    skip = 2 if getattr(function, "jinja_pass_arg", None) is not None else 1  # (context,) value, arguments...

    @functools.wraps(function)
    def bounded(*args, **kwargs):
        if name == "format":  # "%1000000000d"|format(x)
            _check_format_string(args[skip - 1] if len(args) >= skip else None)
        _check_arguments(args[skip:], kwargs)
        return _checked(function(*args, **kwargs))
    return bounded


@lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    """Compile once per template string in transformers' sandboxed environment, with every way
    a template builds a value held to the rendering's cap (see the module docstring)."""
    # Imported on first use (see the module docstring): runs without a chat template never pay for jinja2.
    import jinja2
    from jinja2.compiler import CodeGenerator
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node, frame):  # `a ~ b`: its result checked
            self.write("environment.checked(")
            super().visit_Concat(node, frame)
            self.write(")")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(_BINOPS)
        code_generator_class = BoundedCodeGenerator
        concat = staticmethod(_bounded_join)
        checked = staticmethod(_checked)

        def call_binop(self, context, operator_name, left, right):
            return _bounded_binop(operator_name, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (jinja's own spelling)
            _check_arguments(args, kwargs)
            return _checked(super().call(__context, __obj, *args, **kwargs))

        def wrap_str_format(self, value):  # "{:>1000000000}".format(x): refused before it runs
            if isinstance(value, (types.MethodType, types.BuiltinMethodType)) and value.__name__ in ("format",
                                                                                                  "format_map"):
                _check_format_string(value.__self__)
            return super().wrap_str_format(value)

    environment = BoundedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_generation_tag_extension(), loopcontrols],
    )

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; chat templates want plain JSON.
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format_string):
        return datetime.now().strftime(format_string)

    environment.filters["tojson"] = tojson
    environment.filters = {name: _bounded_filter(name, f) for name, f in environment.filters.items()}
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    environment.globals["range"] = _bounded_range
    return environment.from_string(template)


@lru_cache(maxsize=1)
def _generation_tag_extension():
    """Jinja extension accepting ``{% generation %}...{% endgeneration %}`` (renders the body).

    transformers uses the tag to find assistant tokens; we only need templates that use it to
    compile and render the same text.
    """
    # Imported on first use, like in _compile_chat_template: the class derives from jinja2's.
    import jinja2
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

        def _render_body(self, caller):
            return caller()

    return GenerationTag
