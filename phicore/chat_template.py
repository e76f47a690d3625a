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
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence


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
    """
    conversation = [{key: value for key, value in dict(m).items() if value is not None} for m in messages]
    return _compile_chat_template(template).render(
        messages=conversation,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **variables,
    )


@lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    """Compile once per template string in transformers' sandboxed environment."""
    # Imported on first use (see the module docstring): runs without a chat template never pay for jinja2.
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(
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
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
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
