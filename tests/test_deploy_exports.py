"""Deployment exports (issue 16 items 4, 5, 7), each checked by the reader that matters:

- Ollama (`--ollama DIR`): the Modelfile is read back by a port of Ollama's Modelfile parser
  (parser/parser.go: triple-quoted values verbatim, unprintable characters dropped) and its
  TEMPLATE executed by a small Go text/template renderer written here for the subset
  phicore.export.ollama emits (range over .Messages, if/else if on .Role, eq/ne/and/not/len/
  slice, .Content, string literals, $variables), fed the messages Ollama builds (SYSTEM
  prepended when the request has none, consecutive roles merged). Oracle: phicore's own
  prompt rendering (`PromptFormat.format_prompt_for_generation`) and its token ids, for one
  turn, several turns, with and without a system message, on the tiny presets, the real
  Phi-2 / Phi-3-mini-4k / Phi-3.5-mini tokenizers and custom templates. Ollama itself is not
  installed here: its own loading of the folder is not verified (the GGUF is llama.cpp's
  format, checked in test_export.py).
- MLX (`--mlx-adapter DIR`): mlx_lm (`mlx_lm.utils.load(BASE, adapter_path=DIR)`) loads the
  tiny Phi-2 and Phi-3 bases with the exported adapter and gives phicore's logits within
  MLX_LOGIT_TOL (float32; measured about 1e-6), for LoRA, DoRA, and rsLoRA with per-layer
  ranks and alphas. Skipped where mlx cannot be imported.
- Model card and hub push (`--push-to-hub`): README.md of a finished run read back; the hub
  calls are huggingface_hub.HfApi's create_repo / upload_folder / upload_file patched with
  recorders (no network): repo id, repo type "model", private flag, the files; a missing token
  is one line and exit 2 before any work, a failed upload one line and exit 1 with the
  finished run unchanged.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tiny_models import SHARED, make_adapter  # noqa: E402
from train_runs import run_infer, run_main, write_jsonl  # noqa: E402

from phicore.data import prompt_format_for  # noqa: E402
from phicore.data.tokenization import encode_prompt  # noqa: E402
from phicore.export import ExportError  # noqa: E402
from phicore.export.model_card import CARD_NAME, render_model_card  # noqa: E402
from phicore.export.ollama import (GGUF_NAME, MODELFILE_NAME, go_template, modelfile, probe_conversations,  # noqa: E402
                                   turn_text)
from phicore.inference import load_session  # noqa: E402
from phicore.lora import LoRALinear, apply_lora, lora_layers  # noqa: E402
from phicore.record import RunRecord  # noqa: E402
from phicore.tokenizer import load_tokenizer  # noqa: E402
from phicore.weights import load_model  # noqa: E402

MODELS = SHARED / "models"
MLX_LOGIT_TOL = 1e-4  # float32 logits, max abs difference (measured: under 1e-6)


# ============================================================================ Ollama's side, ported
def parse_modelfile(text: str) -> list:
    """[(command, argument)] as Ollama's parser.ParseFile reads a Modelfile (state machine ported
    from parser/parser.go: values end at whitespace unless inside quotes, \"\"\"...\"\"\" and
    "..." unquoted verbatim, unprintable characters outside a quoted newline/space dropped)."""
    def is_space(ch):
        return ch in " \t"

    def is_newline(ch):
        return ch in "\r\n"

    def printable(ch):  # Go's strconv.IsPrint: graphic characters and the ASCII space
        return ch == " " or (ch.isprintable() and not ch.isspace())

    def unquote(s):
        if s[:3] == '"""':
            return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
        if s[:1] == '"':
            return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
        return s, True

    def next_state(ch, state):
        if state == "nil":
            if ch == "#":
                return "comment", None
            return ("nil", None) if is_space(ch) or is_newline(ch) else ("name", ch)
        if state == "name":
            if ch.isalpha() and ch.isascii():
                return "name", ch
            if is_space(ch):
                return "value", None
            raise ValueError(f"invalid command character {ch!r}")
        if state == "value":
            return ("nil", ch) if is_newline(ch) or is_space(ch) else ("value", ch)
        if state == "parameter":
            if (ch.isascii() and ch.isalnum()) or ch == "_":
                return "parameter", ch
            if is_space(ch):
                return "value", None
            raise ValueError("bad parameter name")
        if state == "comment":
            return ("nil", None) if is_newline(ch) else ("comment", None)
        raise AssertionError(state)

    commands, state, buf, name = [], "nil", [], None
    for ch in text:
        new, r = next_state(ch, state)
        if new != state:
            if state == "name":
                word = "".join(buf).lower()
                assert word in {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
                                "parameter", "message", "requires"}, word
                if word == "from":
                    name = "model"
                elif word == "parameter":
                    new = "parameter"
                else:
                    name = word
            elif state == "parameter":
                name = "".join(buf)
            elif state == "value":
                value, ok = unquote("".join(buf).strip())
                if not ok or is_space(ch):
                    buf.append(ch)
                    continue
                commands.append((name, value))
            buf, state = [], new
        if r is not None and printable(r):
            buf.append(r)
    if state == "value":
        value, ok = unquote("".join(buf).strip())
        assert ok, "unterminated quoted value"
        commands.append((name, value))
    else:
        assert state in ("nil", "comment"), f"ends inside a {state}"
    return commands


def ollama_messages(messages: list, system) -> list:
    """The messages Ollama hands the template (api.Message structs: .Role, .Content): the
    Modelfile's SYSTEM first when the request has no system message of its own
    (server/routes.go), consecutive messages of one role merged with a blank line
    (template.collate)."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + list(messages)
    merged = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append(dict(m))
    return [{"Role": m["role"], "Content": m["content"]} for m in merged]


class GoTemplate:
    """Go text/template for the subset phicore.export.ollama documents; anything else raises."""

    _ACTION = re.compile(r'\{\{(-\s)?((?:"(?:\\.|[^"\\])*"|[^"}]|\}(?!\}))*?)(\s-)?\}\}', re.S)
    _TOKEN = re.compile(r'\s*("(?:\\.|[^"\\])*"|\(|\)|:=|=|,|\$\.[A-Za-z]+|\$[A-Za-z_]*|\.[A-Za-z]+|[A-Za-z_]+|\d+)')

    def __init__(self, source: str):
        pieces, pos = [], 0
        for match in self._ACTION.finditer(source):
            pieces += [("text", source[pos:match.start()]), ("action", match.group(2).strip(),
                                                               bool(match.group(1)), bool(match.group(3)))]
            pos = match.end()
        pieces.append(("text", source[pos:]))
        for i, piece in enumerate(pieces):  # trim markers: "{{- " and " -}}" eat the adjacent whitespace
            if piece[0] == "action" and piece[2]:
                pieces[i - 1] = ("text", pieces[i - 1][1].rstrip(" \t\r\n"))
            if piece[0] == "action" and piece[3]:
                pieces[i + 1] = ("text", pieces[i + 1][1].lstrip(" \t\r\n"))
        assert "{{" not in "".join(p[1] for p in pieces if p[0] == "text"), "unparsed action"
        self.nodes, rest = self._parse([p for p in pieces if p[0] == "action" or p[1]], 0)
        assert rest is None

    def _parse(self, pieces, i, stop=("end",)):
        """Nodes up to one of `stop` (the keyword found is returned with the index after it)."""
        nodes = []
        while i < len(pieces):
            piece = pieces[i]
            if piece[0] == "text":
                nodes.append(("text", piece[1]))
                i += 1
                continue
            action = piece[1]
            keyword = action.split()[0] if action else ""
            if keyword in ("end", "else"):
                return nodes, (keyword, action, i + 1)
            if keyword == "range":
                match = re.fullmatch(r"range\s+(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.+)", action, re.S)
                assert match, action
                body, (word, _, i) = self._parse(pieces, i + 1)
                assert word == "end"
                nodes.append(("range", match.group(1), match.group(2), self._pipe(match.group(3)), body))
                continue
            if keyword == "if":
                branches, condition = [], self._pipe(action[2:])
                while True:
                    body, (word, text, i) = self._parse(pieces, i + 1 if not branches else i)
                    branches.append((condition, body))
                    if word == "end":
                        break
                    rest = text[4:].strip()  # after "else"
                    condition = self._pipe(rest[2:]) if rest.startswith("if") else None
                nodes.append(("if", branches))
                continue
            match = re.fullmatch(r"(\$\w+)\s*(:=|=)\s*(.+)", action, re.S)
            if match:
                nodes.append(("set", match.group(1), self._pipe(match.group(3))))
            else:
                nodes.append(("out", self._pipe(action)))
            i += 1
        return nodes, None

    def _pipe(self, text: str):
        tokens, pos = [], 0
        text = text.strip()
        while pos < len(text):
            match = self._TOKEN.match(text, pos)
            assert match and match.group(1), f"unsupported template syntax at {text[pos:]!r}"
            tokens.append(match.group(1))
            pos = match.end()
        expr, rest = self._command(tokens, 0)
        assert rest == len(tokens), text
        return expr

    def _command(self, tokens, i):
        """A function call with its arguments, or one operand, up to ')' or the end."""
        if tokens[i] in ("eq", "ne", "and", "or", "not", "len", "slice", "print"):
            name, args, i = tokens[i], [], i + 1
            while i < len(tokens) and tokens[i] != ")":
                arg, i = self._operand(tokens, i)
                args.append(arg)
            return ("call", name, args), i
        return self._operand(tokens, i)

    def _operand(self, tokens, i):
        token = tokens[i]
        if token == "(":
            expr, i = self._command(tokens, i + 1)
            assert tokens[i] == ")"
            return expr, i + 1
        if token.startswith('"'):
            return ("lit", ast.literal_eval(token)), i + 1  # Go's escapes used here are Python's too
        if token.isdigit():
            return ("lit", int(token)), i + 1
        if token.startswith("$."):
            return ("root", token[2:]), i + 1
        if token.startswith("$"):
            return ("var", token), i + 1
        if token.startswith("."):
            return ("field", token[1:]), i + 1
        raise AssertionError(f"unsupported operand {token!r}")

    @staticmethod
    def _truth(value) -> bool:
        return bool(value)  # false, 0, "", empty list / map: false, as in Go

    def _eval(self, expr, dot, root, env):
        kind = expr[0]
        if kind == "lit":
            return expr[1]
        if kind == "field":
            return dot[expr[1]]
        if kind == "root":
            return root[expr[1]]
        if kind == "var":
            return env[expr[1]]
        name, args = expr[1], [self._eval(a, dot, root, env) for a in expr[2]]
        if name == "eq":
            return any(args[0] == other for other in args[1:])
        if name == "ne":
            return args[0] != args[1]
        if name == "and":
            return next((a for a in args if not self._truth(a)), args[-1])
        if name == "or":
            return next((a for a in args if self._truth(a)), args[-1])
        if name == "not":
            return not self._truth(args[0])
        if name == "len":
            return len(args[0])
        if name == "slice":
            return args[0][args[1]:args[2]] if len(args) > 2 else args[0][args[1]:]
        if name == "print":
            return "".join(str(a) for a in args)
        raise AssertionError(name)

    def _run(self, nodes, dot, root, env, out):
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "out":
                value = self._eval(node[1], dot, root, env)
                out.append(value if isinstance(value, str) else str(value).lower() if isinstance(value, bool)
                           else str(value))
            elif kind == "set":
                env[node[1]] = self._eval(node[2], dot, root, env)
            elif kind == "if":
                for condition, body in node[1]:
                    if condition is None or self._truth(self._eval(condition, dot, root, env)):
                        self._run(body, dot, root, env, out)
                        break
            elif kind == "range":
                for index, item in enumerate(self._eval(node[3], dot, root, env)):
                    env[node[1]], env[node[2]] = index, item
                    self._run(node[4], item, root, env, out)

    def render(self, data: dict) -> str:
        out = []
        self._run(self.nodes, data, data, {"$": data}, out)
        return "".join(out)


def test_go_renderer_on_ollamas_own_phi3_template():
    """The renderer itself, on the phi3 template of Ollama's library (template/phi-3.gotmpl)."""
    template = GoTemplate('{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n'
                          '<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ if (and $last (ne .Role "assistant")) }}'
                          '<|assistant|>\n{{ end }}\n{{- end }}')
    messages = [{"Role": "system", "Content": "S"}, {"Role": "user", "Content": "U"}]
    assert template.render({"Messages": messages}) == "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\n"


# ============================================================================ Ollama: template vs phicore
def _extra_conversations() -> list:
    """Beyond the export's own probes: other contents (quotes, braces, backslashes, unicode)."""
    odd = 'Say "hi" {{ .Content }} \\ and \u00e9t\u00e9 \u2014 ok?'
    return [([{"role": "user", "content": odd}], None),
            ([{"role": "user", "content": "a"}, {"role": "assistant", "content": odd},
              {"role": "user", "content": "b"}], "Rules:\n- short\n- kind")]


def _check_template_against_phicore(tokenizer, prompt_format):
    """TEMPLATE (through the Modelfile parser) rendered by the Go renderer == phicore's prompt
    text and ids, for every probe conversation, with the system message given as SYSTEM."""
    turns = turn_text(prompt_format, tokenizer)
    text = modelfile(go_template(turns), ["<|end|>"], system="placeholder")
    parsed = dict(parse_modelfile(text))
    template = GoTemplate(parsed["template"])
    assert parsed["template"] == go_template(turns)
    checked = 0
    for messages, system in probe_conversations() + _extra_conversations():
        expected = prompt_format.format_prompt_for_generation(messages, system=system)
        rendered = template.render({"Messages": ollama_messages(messages, system), "System": system or ""})
        assert expected == turns.runtime_bos + rendered, (messages, system)  # runtime_bos: "" unless BOS is added
        assert encode_prompt(tokenizer, rendered) == encode_prompt(tokenizer, expected)
        checked += 1
    assert checked == 8
    return turns


@pytest.mark.parametrize("name", ["tiny-phi-2", "tiny-phi-3"])
def test_ollama_template_renders_the_tiny_presets_prompts(bases, name):
    tokenizer = load_tokenizer(bases[name])
    turns = _check_template_against_phicore(tokenizer, prompt_format_for(tokenizer))
    assert bool(turns.generation) == (name == "tiny-phi-3")  # Phi-3 opens the assistant's turn after the loop


@pytest.mark.parametrize("name", ["phi-2", "phi-3-mini-4k-instruct", "phi-3.5-mini-instruct"])
def test_ollama_template_renders_real_tokenizers_prompts(name):
    folder = MODELS / name
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{folder} not present (shared/models)")
    tokenizer = load_tokenizer(folder)
    turns = _check_template_against_phicore(tokenizer, prompt_format_for(tokenizer))
    if name == "phi-3-mini-4k-instruct":  # its template drops system messages and writes <s> first
        assert "system" not in turns.before and turns.start == "<s>"
    if name == "phi-3.5-mini-instruct":
        assert turns.skip_empty_system and turns.before["system"] == ("<|system|>\n",)


def test_ollama_leaves_bos_to_the_runtime_when_the_tokenizer_adds_it():
    """A template that writes {{ bos_token }} for a tokenizer that adds BOS itself: llama.cpp adds
    it while tokenising, so the TEMPLATE leaves it out and the ids stay phicore's."""
    folder = MODELS / "phi-3-mini-4k-instruct"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{folder} not present (shared/models)")
    from phicore.tokenizer import Tokenizer

    plain = load_tokenizer(folder)
    tokenizer = Tokenizer(plain.backend, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
                          pad_token="<|endoftext|>", chat_template=plain.chat_template, add_bos_token=True)
    turns = _check_template_against_phicore(tokenizer, prompt_format_for(tokenizer))
    assert turns.runtime_bos == "<s>" and not go_template(turns).startswith('{{- "<s>"')


@pytest.mark.parametrize("template", ["### Q: {prompt}\n### A: {response}</s>",
                                      "<sys>{system}</sys>\nQ: {prompt}\nA:   {response}"])
def test_ollama_template_renders_custom_templates(bases, template):
    tokenizer = load_tokenizer(bases["tiny-phi-2"])
    _check_template_against_phicore(tokenizer, prompt_format_for(tokenizer, template=template))


def test_ollama_refuses_a_chat_template_it_cannot_express(bases):
    """A template that numbers the turns has no per-role text: refused in one line, not written wrong."""
    tokenizer = load_tokenizer(bases["tiny-phi-3"])
    tokenizer.chat_template = ("{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}{{ loop_end|default('') }}reply:{% endif %}")
    with pytest.raises(ExportError, match="cannot be written as an Ollama template") as info:
        turn_text(prompt_format_for(tokenizer), tokenizer)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["tiny-phi-2", "tiny-phi-3"])
def test_ollama_folder_through_the_cli(bases, tmp_path, name, capsys):
    """infer.py --ollama: model.gguf that the gguf reader opens, and a Modelfile whose every
    line Ollama's parser reads: FROM, TEMPLATE (phicore's prompts), SYSTEM, one stop per stop
    token and stop string of phicore's inference."""
    gguf = pytest.importorskip("gguf")
    adapter = make_adapter(bases[name], tmp_path / "adapter")
    system = 'Answer "briefly".\nNo lists.'
    rc, _ = run_infer("--adapter", adapter, "--ollama", tmp_path / "ollama", "--system", system, "--quiet")
    assert rc == 0, capsys.readouterr().err
    folder = tmp_path / "ollama"
    assert sorted(p.name for p in folder.iterdir()) == sorted([GGUF_NAME, MODELFILE_NAME])
    assert len(gguf.GGUFReader(str(folder / GGUF_NAME)).tensors) > 0
    commands = parse_modelfile((folder / MODELFILE_NAME).read_text(encoding="utf-8"))
    assert commands[0] == ("model", f"./{GGUF_NAME}")
    values = dict(commands[:3])
    assert values["system"] == system
    session = load_session(adapter, device="cpu")
    stops = [arg for command, arg in commands if command == "stop"]
    expected_stops = [session.tokenizer.decode([i]) for i in session.stop_ids] + session.text_stops
    assert stops == [s for s in expected_stops if s.strip()]
    if name == "tiny-phi-2":
        assert "\nInstruct:" in stops  # a stop string with a newline, intact through the parser
    template = GoTemplate(values["template"])
    for prompt in ("Tell me a joke.", "Two\nlines"):
        rendered = template.render({"Messages": ollama_messages([{"role": "user", "content": prompt}], system)})
        assert rendered == session.prompt_text(prompt, system=system)
        assert encode_prompt(session.tokenizer, rendered) == session.prompt_ids(prompt, system=system)


def test_ollama_bad_targets_are_one_line(bases, tmp_path, capsys):
    adapter = make_adapter(bases["tiny-phi-3"], tmp_path / "adapter")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep", encoding="utf-8")
    rc, _ = run_infer("--adapter", adapter, "--ollama", taken)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--ollama" in err and "not an empty folder" in err
    assert [p.name for p in taken.iterdir()] == ["x"]
    rc, _ = run_infer("--adapter", adapter, "--ollama", tmp_path / "o", "--quantize", "nf4")
    assert rc == 2 and "--quantize" in capsys.readouterr().err


def test_modelfile_refuses_what_it_cannot_hold():
    with pytest.raises(ExportError, match='"""'):
        modelfile("{{ .Prompt }}", [], system='a """ b')
    with pytest.raises(ExportError, match="U\\+0007"):
        modelfile("{{ .Prompt }}", [], system="bell \a")


# ============================================================================ MLX
@pytest.mark.parametrize("name, variant", [("tiny-phi-2", "lora"), ("tiny-phi-3", "lora"), ("tiny-phi-2", "dora"),
                                           ("tiny-phi-3", "dora"), ("tiny-phi-3", "rslora+patterns"),
                                           ("tiny-phi-2", "rslora+patterns")])
def test_mlx_adapter_gives_phicores_logits_in_mlx_lm(bases, tmp_path, name, variant, capsys):
    """Oracle: mlx_lm loads the base folder with the exported adapter; its logits equal phicore's
    base + adapter (unmerged) within MLX_LOGIT_TOL, and differ from the base alone."""
    mx = pytest.importorskip("mlx.core")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    import numpy as np
    from safetensors.numpy import load_file

    adapter = make_adapter(bases[name], tmp_path / "adapter", use_dora=variant == "dora",
                           use_rslora="rslora" in variant, patterns="patterns" in variant)
    out = tmp_path / "mlx"
    rc, _ = run_infer("--adapter", adapter, "--mlx-adapter", out, "--quiet")
    assert rc == 0, capsys.readouterr().err
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    tensors = load_file(str(out / "adapters.safetensors"))
    session = load_session(adapter, device="cpu")
    layers = dict(lora_layers(session.model))
    rank = max(layer.r for layer in layers.values())
    assert config["fine_tune_type"] == ("dora" if variant == "dora" else "lora")
    assert config["num_layers"] == session.model.config.num_hidden_layers
    assert config["lora_parameters"]["rank"] == rank
    assert config["lora_parameters"]["scale"] == (1.0 if "patterns" in variant else 2.0)
    assert set(tensors) == {f"{path}.{leaf}" for path in layers
                            for leaf in (("lora_a", "lora_b", "m") if variant == "dora" else ("lora_a", "lora_b"))}
    for path, layer in layers.items():
        assert tensors[f"{path}.lora_a"].shape == (layer.in_features, rank)
        assert tensors[f"{path}.lora_b"].shape == (rank, layer.out_features)
        assert tensors[f"{path}.lora_a"].dtype == np.float32

    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = session.model(ids).float().numpy()  # (B, T, vocab)
    model, _ = mlx_utils.load(str(session.info.base_model), adapter_path=str(out))
    got = np.array(model(mx.array(ids.numpy())).astype(mx.float32))
    base, _ = mlx_utils.load(str(session.info.base_model))
    base_logits = np.array(base(mx.array(ids.numpy())).astype(mx.float32))
    difference = float(np.abs(got - expected).max())
    print(f"{name} {variant}: mlx_lm vs phicore max |logit difference| {difference:.2e}")
    assert difference < MLX_LOGIT_TOL
    assert float(np.abs(base_logits - expected).max()) > 100 * MLX_LOGIT_TOL  # the adapter is applied


def test_mlx_adapter_refuses_a_layer_outside_the_decoder(bases):
    from phicore.export.mlx_adapter import mlx_adapter

    model = load_model(bases["tiny-phi-3"], device="cpu")
    apply_lora(model, r=2, alpha=4)
    model.lm_head = LoRALinear(model.lm_head, r=2, alpha=4)
    with pytest.raises(ExportError, match="lm_head is not inside a decoder layer"):
        mlx_adapter(model, "base")


# ============================================================================ model card and hub push
def _pairs(n: int) -> list:
    return [{"prompt": f"{i} plus {i % 7}?", "response": f"{i + i % 7}, says my cat."} for i in range(n)]


def _train(tmp_path, *extra, preset="tiny-phi-2", out_name="run") -> tuple:
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(24))
    out = tmp_path / out_name
    rc = run_main("--model", preset, "--data", data, "--out", out, "--max-steps", "4", "--batch-size", "4",
                  "--max-length", "48", "--no-grad-checkpointing", "--quiet", "--eval-every", "2", *extra)
    return rc, out


class FakeHub:
    """Records HfApi's create_repo / upload_folder / upload_file calls; `fail` makes uploads raise."""

    def __init__(self, monkeypatch, fail=None):
        import huggingface_hub

        self.calls, self.fail = [], fail
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, **kwargs):
            hub.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            if hub.fail is not None:
                raise hub.fail

        def upload_file(api, **kwargs):
            hub.calls.append(("upload_file", kwargs["repo_id"], kwargs))
            if hub.fail is not None:
                raise hub.fail

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", upload_file)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")

    def names(self):
        return [call[0] for call in self.calls]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_model_card_of_a_finished_run(tmp_path):
    """README.md: front matter, base, data file and rows (the cache entry's counts), prompt
    format, LoRA settings, steps and losses from the record, the five ways to load it."""
    rc, out = _train(tmp_path)
    assert rc == 0
    card = (out / CARD_NAME).read_text(encoding="utf-8")
    record = RunRecord.read(out / "training_config.json")
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: peft" in front and "- lora" in front and "base_model:" not in front  # a tiny preset
    assert "| base model | `tiny-phi-2`" in body
    assert "| data | `pairs.jsonl`: 24 rows, 24 examples kept" in body
    assert "`Instruct: {prompt}\\nOutput: {response}`" in body
    assert "LoRA: r = 16, alpha = 32.0, scale 2" in body
    assert f"| steps | {record.result['steps']} |" in body
    assert f"| final train loss | {record.result['final_loss']:.4f} |" in body
    assert f"| best validation loss | {record.result['best_val_loss']:.4f}" in body
    for heading in ("### phicore", "### PEFT and transformers", "### llama.cpp", "### Ollama", "### MLX"):
        assert heading in body
    assert f"--adapter {out.name} --mlx-adapter" in body and "--gguf model-q8_0.gguf" in body
    assert "training_curves.png" not in body or (out / "training_curves.png").is_file()
    (out / "training_curves.png").write_bytes(b"\x89PNG fake")
    assert "![training and validation loss, learning rate](training_curves.png)" in render_model_card(out, record)


def test_model_card_for_a_hub_base_and_qlora(tmp_path):
    record = RunRecord(base_model="microsoft/phi-2", prompt_template="instruct",
                       quantization={"type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
                       config={"model": "phi-2", "data": "/home/someone/private/data.jsonl", "lora_r": 8,
                               "lora_alpha": 16, "use_rslora": True, "targets": "all-linear"},
                       result={"steps": 3, "final_loss": 1.5, "best_val_loss": None})
    card = render_model_card(tmp_path, record, repo_id="me/phi2-jokes")
    assert "base_model: microsoft/phi-2" in card and "- base_model:adapter:microsoft/phi-2" in card
    assert "- qlora" in card and "/home/someone" not in card and "`data.jsonl`" in card
    assert "QLoRA: r = 8" in card and "rsLoRA" in card and "BitsAndBytesConfig" in card
    assert 'PeftModel.from_pretrained(base, "me/phi2-jokes")' in card and "hf download me/phi2-jokes" in card


def test_overwrite_sets_the_model_card_aside(tmp_path):
    from phicore.export.model_card import CURVES_PNG, METRICS_CSV, METRICS_JSONL
    from phicore.train.metrics import CSV_NAME, CURVES_NAME, JSONL_NAME
    from phicore.train.output import RUN_FILES, OutputFolder

    assert CARD_NAME in RUN_FILES
    assert (METRICS_JSONL, METRICS_CSV, CURVES_PNG) == (JSONL_NAME, CSV_NAME, CURVES_NAME)  # spelled twice
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / CARD_NAME).write_text("old card", encoding="utf-8")
    assert OutputFolder(folder).set_aside()
    assert (folder / ".replaced" / CARD_NAME).read_text(encoding="utf-8") == "old card"


def test_train_push_to_hub_uploads_the_runs_files(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    rc, out = _train(tmp_path, "--push-to-hub", "me/demo", "--private", "--save-every", "2")
    assert rc == 0
    assert hub.names() == ["create_repo", "upload_folder"]
    _, repo, kwargs = hub.calls[0]
    assert repo == "me/demo" and kwargs == {"repo_type": "model", "private": True, "exist_ok": True}
    _, repo, kwargs = hub.calls[1]
    assert repo == "me/demo" and kwargs["repo_type"] == "model" and Path(kwargs["folder_path"]) == out
    pushed = set(kwargs["allow_patterns"])
    assert {"adapter_model.safetensors", "adapter_config.json", CARD_NAME, "training_config.json", "tokenizer.json",
            "tokenizer_config.json", "metrics.jsonl", "metrics.csv"} <= pushed
    assert all("/" not in name and not name.startswith(("checkpoint", "base", "best", ".")) for name in pushed)
    assert (out / "base").is_dir() and (out / "best").is_dir() and any(out.glob("checkpoint-*"))  # not pushed
    assert 'PeftModel.from_pretrained(base, "me/demo")' in (out / CARD_NAME).read_text(encoding="utf-8")
    record = json.loads((out / "training_config.json").read_text(encoding="utf-8"))
    assert "push_to_hub" not in record["config"] and "private" not in record["config"]  # about one invocation


def test_train_push_without_a_token_stops_before_training(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    hub = FakeHub(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    rc, out = _train(tmp_path, "--push-to-hub", "me/demo")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no Hugging Face token" in err and "HF_TOKEN" in err
    assert not out.exists() and hub.calls == []


def test_train_failed_upload_keeps_the_finished_run(tmp_path, monkeypatch, capsys):
    """exit 1, one line; the run's files are as the run left them; --resume auto pushes it
    (the run is complete: nothing is trained again)."""
    import httpx2  # huggingface_hub's HTTP client here
    from huggingface_hub.errors import HfHubHTTPError

    response = httpx2.Response(500, request=httpx2.Request("POST", "https://huggingface.co/api/x"))
    hub = FakeHub(monkeypatch, fail=HfHubHTTPError("500 Server Error: Internal Server Error", response=response))
    rc, out = _train(tmp_path, "--push-to-hub", "me/demo")
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "upload of" in err and "500 Server Error" in err
    assert "with --resume auto pushes it" in err
    before = _snapshot(out)
    assert RunRecord.read(out / "training_config.json").result is not None and CARD_NAME in before
    hub.fail, hub.calls = OSError("connection reset by peer"), []
    rc, _ = _train(tmp_path, "--push-to-hub", "me/demo", "--resume", "auto")
    assert rc == 1 and "connection reset by peer" in capsys.readouterr().err
    hub.fail, hub.calls = None, []
    rc, _ = _train(tmp_path, "--push-to-hub", "me/demo", "--resume", "auto")
    assert rc == 0 and hub.names() == ["create_repo", "upload_folder"]
    assert "nothing to train" in capsys.readouterr().out
    assert _snapshot(out) == before


def test_push_flag_checks(tmp_path, capsys):
    for args, expected in ((["--private"], "--private"), (["--push-to-hub", "no-slash"], "user/name"),
                           (["--push-to-hub", "me/bad name"], "not a valid hub repo id")):
        rc, _ = _train(tmp_path, *args, out_name="never")
        err = capsys.readouterr().err
        assert rc == 2 and expected in err and err.count("\n") == 1, err
        assert not (tmp_path / "never").exists()
    rc, _ = run_infer("--adapter", tmp_path, "--push-to-hub", "me/x", "--merge", tmp_path / "m", "--gguf",
                      tmp_path / "m.gguf")
    assert rc == 2 and "uploads one thing" in capsys.readouterr().err


def test_infer_pushes_the_adapter_folder_or_the_export(bases, tmp_path, monkeypatch, capsys):
    hub = FakeHub(monkeypatch)
    adapter = make_adapter(bases["tiny-phi-3"], tmp_path / "adapter")
    (adapter / "checkpoint-2").mkdir()
    rc, _ = run_infer("--adapter", adapter, "--push-to-hub", "me/adapter")  # nothing else: the adapter folder
    assert rc == 0, capsys.readouterr().err
    assert hub.names() == ["create_repo", "upload_folder"]
    kwargs = hub.calls[1][2]
    assert Path(kwargs["folder_path"]) == adapter and hub.calls[0][2]["private"] is None
    assert {"adapter_model.safetensors", "adapter_config.json", "training_config.json", "tokenizer.json"} \
        <= set(kwargs["allow_patterns"]) == {p.name for p in adapter.iterdir() if p.is_file()}  # not checkpoint-2/

    hub.calls = []
    gguf_path = tmp_path / "model.gguf"
    pytest.importorskip("gguf")
    rc, _ = run_infer("--adapter", adapter, "--gguf", gguf_path, "--push-to-hub", "me/gguf", "--private", "--quiet")
    assert rc == 0
    assert hub.names() == ["create_repo", "upload_file"] and hub.calls[0][2]["private"] is True
    kwargs = hub.calls[1][2]
    assert (kwargs["path_or_fileobj"], kwargs["path_in_repo"], kwargs["repo_type"]) == (str(gguf_path), "model.gguf",
                                                                                       "model")
    hub.calls = []
    rc, _ = run_infer("--adapter", adapter, "--merge", tmp_path / "merged", "--push-to-hub", "me/merged", "--quiet")
    assert rc == 0 and hub.names() == ["create_repo", "upload_folder"]
    assert Path(hub.calls[1][2]["folder_path"]) == tmp_path / "merged" and hub.calls[1][2]["allow_patterns"] is None


def test_infer_push_failures_are_one_line(bases, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    hub = FakeHub(monkeypatch, fail=OSError("network is unreachable"))
    adapter = make_adapter(bases["tiny-phi-2"], tmp_path / "adapter")
    rc, _ = run_infer("--adapter", adapter, "--mlx-adapter", tmp_path / "mlx", "--push-to-hub", "me/mlx", "--quiet")
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "upload of" in err and "network is unreachable" in err
    assert (tmp_path / "mlx" / "adapters.safetensors").is_file()  # the export is kept
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    hub.calls = []
    rc, _ = run_infer("--adapter", adapter, "--merge", tmp_path / "merged", "--push-to-hub", "me/merged")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no Hugging Face token" in err
    assert not (tmp_path / "merged").exists() and hub.calls == []  # refused before loading or writing
