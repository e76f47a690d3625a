"""The model card (README.md) every finished training run writes into its --out folder.

Rendered from the run record (phicore.record.RunRecord: base model, settings, result), the
tokenised dataset's cache entry (row counts), metrics.jsonl and what else is in the folder
(training_curves.png), so it says what was trained and how to use it:

    ---                     Hugging Face front matter: base_model (a hub id only), library_name
    ...                     peft, pipeline_tag, tags
    ---
    # title
    ## Training             base model, data file (name only) and rows, validation, prompt
                            format, LoRA/QLoRA settings, schedule, steps, final train loss,
                            best validation loss, time; the curves picture
    ## Use it               phicore (infer.py and Python), PEFT + transformers, llama.cpp
                            (--gguf), Ollama (--ollama), MLX (--mlx-adapter, mlx_lm.generate)

Local paths are shown by their last part only (a card is meant to be shared). Missing pieces
(no cache entry, no metrics, an older record) are left out, never an error.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional, Sequence

CARD_NAME = "README.md"
# phicore.train.metrics' JSONL_NAME, CSV_NAME, CURVES_NAME (spelled here: export code does not import training)
METRICS_JSONL, METRICS_CSV, CURVES_PNG = "metrics.jsonl", "metrics.csv", "training_curves.png"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _base_names(record) -> tuple:
    """(what the run was given as --model, the base's hub id or None)."""
    from ..hub import hub_id_for
    from ..tiny import TINY_PRESETS

    given = str(record.config.get("model") or record.base_model)
    if given in TINY_PRESETS:
        return given, None
    repo = hub_id_for(given)
    if _HUB_ID.fullmatch(repo) and not Path(repo).expanduser().exists():
        return given, repo
    recorded = str(record.base_model)
    if _HUB_ID.fullmatch(recorded) and not Path(recorded).expanduser().exists():
        return given, recorded
    return Path(given).name or given, None


def _data_meta(record) -> dict:
    if not record.data_cache:
        return {}
    try:
        meta = json.loads((Path(record.data_cache) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _metrics(folder: Path) -> list:
    rows = []
    try:
        lines = (folder / METRICS_JSONL).read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(value, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _prompt_format(record) -> str:
    template = record.prompt_template or record.config.get("template")
    if template in (None, "chat"):
        return "the base model's chat template (written with the tokenizer files)"
    if template == "instruct":
        return "`Instruct: {prompt}\\nOutput: {response}` (Phi-2's format)"
    return f"`{json.dumps(template)[1:-1]}` (a custom template)"


def _method(record) -> list:
    config = record.config
    r, alpha = config.get("lora_r"), config.get("lora_alpha")
    rslora = bool(config.get("use_rslora"))
    kind = "DoRA" if config.get("use_dora") else "LoRA"
    scale = ""
    if isinstance(r, int) and isinstance(alpha, (int, float)) and r > 0:
        scale = f", scale {alpha / (math.sqrt(r) if rslora else r):g}"
        scale += " (rsLoRA: alpha / sqrt(r))" if rslora else ""
    rows = [("method", f"{'Q' if record.quantized else ''}{kind}: r = {r}, alpha = {_number(alpha, 1)}{scale}, "
                       f"dropout {config.get('lora_dropout')}, targets {config.get('targets')}")]
    if record.quantized:
        q = record.quantization
        rows.append(("quantisation", f"base held in 4-bit {str(q.get('type')).upper()}, double quantisation "
                                     f"{'on' if q.get('double_quant') else 'off'}, "
                                     f"compute dtype {q.get('compute_dtype')}"))
    return rows


def _training_rows(record, folder: Path) -> list:
    config, result = record.config, record.result or {}
    given, repo = _base_names(record)
    rows = [("base model", f"[{repo}](https://huggingface.co/{repo})" if repo else f"`{given}`"
             + (" (phicore's offline random-weight demo preset)" if given.startswith("tiny-") else ""))]
    meta = _data_meta(record)
    data = config.get("data")
    if data:
        stats = meta.get("stats") or {}
        counts = ""
        if stats.get("total") is not None:
            counts = (f": {stats['total']} rows, {stats.get('kept', meta.get('examples'))} examples kept "
                      f"({stats.get('tokens')} tokens, {stats.get('target_tokens')} trained on)")
        rows.append(("data", f"`{Path(str(data)).name}`{counts}"))
    if config.get("val_data"):
        rows.append(("validation", f"`{Path(str(config['val_data'])).name}`"))
    elif config.get("val_split"):
        rows.append(("validation", f"{config['val_split']:g} of the rows held out (seed {config.get('seed')})"))
    rows.append(("prompt format", _prompt_format(record)))
    rows += _method(record)
    world = record.world_size or 1
    batch = f"{config.get('batch_size')} x {config.get('grad_accum')} grad accumulation" + \
            (f" x {world} processes" if world > 1 else "")
    rows.append(("optimisation", f"AdamW, lr {config.get('lr')}, {config.get('scheduler')} schedule, batch {batch}, "
                                 f"max length {config.get('max_length')} tokens"))
    if result:
        steps = f"{result.get('steps')}" + (" (stopped early)" if result.get("stopped_early") else "")
        rows.append(("steps", steps))
        rows.append(("final train loss", _number(result.get("final_loss"))))
        best = result.get("best_val_loss")
        if isinstance(best, (int, float)) and not isinstance(best, bool):
            rows.append(("best validation loss", f"{best:.4f} (perplexity {math.exp(min(best, 50)):.2f})"))
        if isinstance(result.get("seconds"), (int, float)):
            rows.append(("training time", f"{result['seconds']:.1f} s, {result.get('tokens')} tokens"))
    evals = [row for row in _metrics(folder) if isinstance(row.get("val_loss"), (int, float))]
    if evals:
        rows.append(("evaluations", ", ".join(f"step {row.get('step')}: {row['val_loss']:.4f}" for row in evals[-6:])))
    return rows


def _front_matter(record, repo: Optional[str]) -> str:
    tags = ["phicore", "peft", "qlora" if record.quantized else "lora", "text-generation"]
    if record.config.get("use_dora"):
        tags.insert(3, "dora")
    lines = ["---"]
    if repo:
        lines.append(f"base_model: {repo}")
        tags.append(f"base_model:adapter:{repo}")
    lines += ["library_name: peft", "pipeline_tag: text-generation", "tags:"] + [f"- {tag}" for tag in tags]
    return "\n".join(lines + ["---"])


def _usage(record, folder_name: str, repo_id: Optional[str], base_ref: str, stop_texts: Sequence[str]) -> str:
    instruct = (record.prompt_template or record.config.get("template")) not in (None, "chat")
    adapter = repo_id or folder_name
    get = f"hf download {repo_id} --local-dir {folder_name}\n" if repo_id else ""
    prompt = "Tell me a joke about cats."
    raw_prompt = f"Instruct: {prompt}\\nOutput:" if record.prompt_template == "instruct" else prompt
    if instruct:
        peft_prompt = (f'prompt = "{raw_prompt}"\n'
                       'ids = tokenizer(prompt, return_tensors="pt").input_ids')
    else:
        peft_prompt = (f'messages = [{{"role": "user", "content": "{prompt}"}}]\n'
                       'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")')
    quant = ""
    if record.quantized:
        q = record.quantization
        quant = (f"\n# trained with QLoRA: load the base in 4-bit NF4 as in training (bitsandbytes)\n"
                 f"from transformers import BitsAndBytesConfig\n"
                 f"bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", "
                 f"bnb_4bit_use_double_quant={bool(q.get('double_quant'))}, "
                 f"bnb_4bit_compute_dtype=torch.{q.get('compute_dtype') or 'bfloat16'})\n")
    load_kwargs = "quantization_config=bnb" if record.quantized else "torch_dtype=torch.bfloat16"
    extra_eos = [t for t in stop_texts if t.startswith("<|") and t != "<|endoftext|>"]  # Phi-3's <|end|>
    eos_flags = (" --extra-eos-token " + " ".join(f'"{t}"' for t in extra_eos)) if extra_eos else ""
    mlx_prompt = f'--prompt "{raw_prompt}"' + (" --ignore-chat-template" if instruct else "")
    return f"""## Use it

Prompts must be formatted as in training, with {_prompt_format(record)}. phicore's own tools do
that for you, and its exports (GGUF chat template, Ollama Modelfile) carry the format with them.

### phicore

```bash
{get}python infer.py --adapter {folder_name} --prompt "{prompt}"
python infer.py --adapter {folder_name}                       # chat in the terminal
```

```python
from phicore.inference import GenerationSettings, load_session

session = load_session("{folder_name}")
print(session.answer("{prompt}", GenerationSettings(max_new_tokens=128)).text)
```

### PEFT and transformers

```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
{quant}
base = AutoModelForCausalLM.from_pretrained("{base_ref}", {load_kwargs})
model = PeftModel.from_pretrained(base, "{adapter}")
tokenizer = AutoTokenizer.from_pretrained("{adapter}")
{peft_prompt}
out = model.generate(ids.to(model.device), max_new_tokens=128)
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
```

### llama.cpp

```bash
python infer.py --adapter {folder_name} --gguf model-q8_0.gguf --gguf-type q8_0   # base + adapter merged
llama-cli -m model-q8_0.gguf -p "{raw_prompt}" -n 128
```

### Ollama

```bash
python infer.py --adapter {folder_name} --ollama ollama-model     # model.gguf + Modelfile (template, stops)
ollama create my-model -f ollama-model/Modelfile
ollama run my-model "{prompt}"
```

### MLX (Apple silicon)

```bash
python infer.py --adapter {folder_name} --mlx-adapter mlx-adapter   # adapters.safetensors + adapter_config.json
mlx_lm.generate --model {base_ref} --adapter-path mlx-adapter {mlx_prompt}{eos_flags}
```
"""


def render_model_card(folder, record, *, repo_id: Optional[str] = None, stop_texts: Sequence[str] = ()) -> str:
    """The README.md text for the finished run in `folder` described by `record` (a RunRecord).
    `repo_id`: where it is pushed (the snippets then load from the hub); `stop_texts`: the
    tokenizer's stop tokens as text (mlx_lm.generate is told to stop on them)."""
    folder = Path(folder)
    given, repo = _base_names(record)
    title = repo_id.split("/")[-1] if repo_id else folder.resolve().name
    tiny = given.startswith("tiny-")
    # a tiny preset's base is OUT/base, which is not pushed: rebuilt from its seed instead
    base_ref = repo or ((f"{given}-base" if repo_id else f"{title}/base") if tiny else given)
    kind = ("QLoRA" if record.quantized else "LoRA") + (" (DoRA)" if record.config.get("use_dora") else "")
    lines = [_front_matter(record, repo), "", f"# {title}", "",
             f"A {kind} adapter for {f'[{repo}](https://huggingface.co/{repo})' if repo else f'`{given}`'}, "
             "fine-tuned with phicore (LoRA/QLoRA for Phi-2 and Phi-3 models). "
             "The adapter is in PEFT's format (adapter_model.safetensors, adapter_config.json); "
             "training_config.json holds every setting of the run (`python train.py --config "
             "training_config.json` runs it again).", "", "## Training", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in _training_rows(record, folder)]
    if (folder / CURVES_PNG).is_file():
        lines += ["", f"![training and validation loss, learning rate]({CURVES_PNG})"]
    if tiny:
        lines += ["", f"The base is phicore's `{given}` preset, random weights made in code (an offline demo "
                      f"that knows nothing), in `{base_ref}`: `phicore.tiny.build_tiny(\"{given}\", \"{base_ref}\", "
                      f"seed={record.config.get('seed')})` builds it again."]
    lines += ["", _usage(record, title, repo_id, base_ref, stop_texts)]
    return "\n".join(lines)


def write_model_card(folder, record, *, repo_id: Optional[str] = None, stop_texts: Sequence[str] = ()) -> Path:
    """Write FOLDER/README.md (atomically); returns its path."""
    from ..weights import atomic_write_text

    path = Path(folder) / CARD_NAME
    atomic_write_text(path, render_model_card(folder, record, repo_id=repo_id, stop_texts=stop_texts))
    return path
