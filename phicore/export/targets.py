"""infer.py's exports as one call, for the command line and for Python: `ExportOptions` (the
export flags, declared once) and `export(options, session)`.

    --merge DIR        a Hugging Face folder of base + adapter merged     (merge.py)
    --gguf FILE        that model as GGUF, f16 ... q4_k_m                  (gguf.py, kquants.py, quant_plan.py)
    --gguf-lora FILE   the adapter alone in llama.cpp's LoRA format        (gguf_lora.py)
    --ollama DIR       the merged GGUF and a Modelfile                     (ollama.py)
    --mlx-adapter DIR  the adapter in mlx-lm's format                      (mlx_adapter.py)
    --push-to-hub ID   the adapter folder, or the one export written       (phicore/hub_push.py)

Every export is read back and checked against the model in memory (verify.py); `--verify`
also runs a GGUF in llama.cpp. The adapter-only exports are written before the model is
merged, the merged ones after. An output that cannot be written, or does not read back as the
model, is an `OutputError` (one line naming the flag and path; infer.py exits 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Callable, Optional

from ..settings import SettingsError, check, setting
from . import ExportError
from .quant_plan import GGUF_TYPES

Log = Callable[[str], None]


@dataclasses.dataclass
class ExportOptions:
    """What to export and where: infer.py's "export" flags."""

    merge: Optional[str] = setting(None, "write base + adapter merged as a Hugging Face folder", section="export",
                                   metavar="DIR")
    max_shard_size: str = setting("5GB", "--merge: largest safetensors shard (e.g. 5GB, 500MB)", section="export",
                                  metavar="SIZE")
    gguf: Optional[str] = setting(None, "write base + adapter merged as a GGUF file for llama.cpp", section="export",
                                  metavar="FILE")
    gguf_type: str = setting("f16", "--gguf: weight type; q4_k_m, q5_k_m, q6_k, q4_0 and q8_0 follow llama-quantize's "
                             "mixtures (e.g. q4_k_m: Q4_K with Q6_K for output and some attn_v/ffn_down)",
                             section="export", choices=GGUF_TYPES)
    gguf_lora: Optional[str] = setting(None, "write the adapter alone as a llama.cpp LoRA adapter GGUF, for a GGUF of "
                                       "the dense base (llama-cli -m BASE.gguf --lora FILE)", section="export",
                                       metavar="FILE")
    verify: bool = setting(False, "--gguf/--gguf-lora/--ollama: also run the GGUF in llama.cpp (needs "
                           "llama-cpp-python): token ids, logits and a greedy answer against phicore's (every export "
                           "is read back and checked anyway)", section="export")
    ollama: Optional[str] = setting(None, "write an Ollama folder: the merged GGUF (--gguf-type) and a Modelfile with "
                                    "the prompt format as trained, its stop strings and --system (then: ollama "
                                    "create NAME -f DIR/Modelfile)", section="export", metavar="DIR")
    mlx_adapter: Optional[str] = setting(None, "write the adapter in mlx-lm's format for Apple silicon "
                                         "(adapters.safetensors, adapter_config.json; then: mlx_lm.generate "
                                         "--model BASE --adapter-path DIR)", section="export", metavar="DIR")
    push_to_hub: Optional[str] = setting(None, "upload to this Hugging Face hub model repo: the adapter folder, or "
                                         "what --merge/--gguf/--gguf-lora/--ollama/--mlx-adapter wrote (token: "
                                         "HF_TOKEN or the saved `hf auth login`)", section="export", metavar="REPO_ID")
    private: bool = setting(False, "--push-to-hub: create the repo private", section="export")

    def __post_init__(self):
        from .merge import parse_size
        from ..hub_push import check_push_flags

        check(self)
        if self.verify and not (self.gguf or self.gguf_lora or self.ollama):
            raise SettingsError("--verify runs a written GGUF in llama.cpp: give --gguf, --gguf-lora or --ollama",
                                field="verify")
        try:
            self.max_shard_bytes = parse_size(self.max_shard_size)
        except ExportError as err:
            raise SettingsError(str(err), field="max_shard_size") from None
        check_push_flags(self.push_to_hub, self.private)
        if self.push_to_hub:
            if len(self.targets) > 1:
                raise SettingsError("--push-to-hub uploads one thing: give one of " + ", ".join(self.targets)
                                    + " (or none, to push the adapter folder)", field="push_to_hub")

    @property
    def targets(self) -> list:
        """The flags of the exports asked for."""
        exports = (("--merge", self.merge), ("--gguf", self.gguf), ("--gguf-lora", self.gguf_lora),
                   ("--ollama", self.ollama), ("--mlx-adapter", self.mlx_adapter))
        return [flag for flag, value in exports if value]

    @property
    def merges(self) -> bool:
        """Whether an export needs base + adapter merged (and so the dense base)."""
        return bool(self.merge or self.gguf or self.ollama)

    @property
    def exporting(self) -> bool:
        return bool(self.targets)


class OutputError(Exception):
    """An output that could not be written (disk full, read-only or missing folder), or that does
    not read back as the model: one line naming the flag, the path and the reason; CLI exit 1."""


@contextlib.contextmanager
def writing(flag: str, path):
    """Turn an OSError while writing `path` into an OutputError naming the flag and path."""
    try:
        yield
    except OSError as err:
        raise OutputError(f"{flag} {path}: cannot write ({err.strerror or err})") from err


def check_writable(flag: str, path) -> None:
    """OutputError, before anything is loaded, when `path` can certainly not be written: its
    nearest existing folder is on a read-only file system or not writable by this user."""
    folder = Path(path).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{flag} {path}: cannot write ({folder} is not a folder)")
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise OutputError(f"{flag} {path}: cannot write (read-only file system at {folder})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: cannot write (permission denied in {folder})")


def check_targets(options: ExportOptions) -> None:
    """What needs the file system (and the hub token), checked before the model is loaded:
    ExportError for bad input, OutputError for a place that cannot be written."""
    from .gguf import import_gguf
    from .merge import check_target_folder

    if options.merge:
        check_target_folder(options.merge)
        check_writable("--merge", options.merge)
    for flag, file in (("--gguf", options.gguf), ("--gguf-lora", options.gguf_lora)):
        if file:
            import_gguf()
            if Path(file).is_dir():
                raise ExportError(f"{flag} {file}: is a folder; give a file name such as model.gguf")
            check_writable(flag, file)
    if options.gguf and options.gguf_lora and Path(options.gguf).absolute() == Path(options.gguf_lora).absolute():
        raise ExportError("--gguf and --gguf-lora name the same file")
    for flag, folder in (("--ollama", options.ollama), ("--mlx-adapter", options.mlx_adapter)):
        if folder:
            from .folders import check_new_folder

            check_new_folder(folder, flag)
            check_writable(flag, folder)
    if options.ollama:
        import_gguf()
    if options.push_to_hub:
        from ..hub_push import hub_token

        hub_token()  # nothing to authenticate with: found before the model is loaded


def _verified(flag: str, check, log: Log) -> None:
    """Log the lines of an export's self-check (phicore.export.verify); a file that does not read back
    as the model in memory is an OutputError (exit 1) naming it and the tensor."""
    from . import VerifyError

    try:
        lines = check()
    except VerifyError as err:
        raise OutputError(f"{flag}: {err}") from err
    for line in lines:
        log(f"  {line}")


def _export_gguf_lora(options, session, reference, log) -> None:
    """--gguf-lora FILE: the adapter alone in llama.cpp's format, checked against its layers."""
    from .gguf_lora import QLORA_ADAPTER_NOTE, write_gguf_lora
    from .verify import check_gguf_lora

    if session.info.quantized:
        log(QLORA_ADAPTER_NOTE)
    with writing("--gguf-lora", options.gguf_lora):
        plan = write_gguf_lora(session.model, options.gguf_lora, name=Path(options.gguf_lora).stem, warn=log)
    log(f"LoRA adapter GGUF ({len(plan.tensors)} layers, alpha {plan.alpha:g}) written to {options.gguf_lora}")
    _verified("--gguf-lora", lambda: check_gguf_lora(options.gguf_lora, reference, llama=options.verify), log)


def export(options: ExportOptions, session, *, system: Optional[str] = None, show_progress: bool = True,
           log: Log = print) -> None:
    """Write and check every export `options` asks for, from a loaded adapter session
    (phicore.inference.load_session, with dense=options.merges). The session's model is merged
    in place for the merged exports. `system`: Ollama's SYSTEM message."""
    from .merge import merge_adapter, qlora_note, save_merged
    from .verify import reference_from_session

    reference = reference_from_session(session)  # its model is session.model: merged below, in place
    if options.gguf_lora:  # the adapter on its own: written before the model is merged
        _export_gguf_lora(options, session, reference, log)
    if options.mlx_adapter:  # the adapter on its own: written before the model is merged
        _export_mlx_adapter(options, session, log)
    if not options.merges:
        return  # nothing below is asked for: no need to merge
    merge_adapter(session.model)  # in place: the session's model is now base + adapter, merged
    if session.info.quantized:
        log(qlora_note(session.model.dtype))
    if options.merge:
        with writing("--merge", options.merge):
            save_merged(session.model, session.tokenizer, options.merge, stop_ids=session.stop_ids,
                        max_shard_bytes=options.max_shard_bytes)
        log(f"merged model written to {options.merge}")
        from .verify import check_merged_folder

        _verified("--merge", lambda: check_merged_folder(options.merge, reference), log)
    if options.gguf:
        from .gguf import find_sentencepiece_model, write_gguf
        from .verify import check_gguf

        spm = find_sentencepiece_model([session.info.directory, session.info.base_model])
        with writing("--gguf", options.gguf):
            write_gguf(session.model, session.tokenizer, options.gguf, options.gguf_type,
                       name=Path(options.gguf).stem, sentencepiece_model=spm,
                       show_progress=show_progress, warn=log)
        log(f"GGUF ({options.gguf_type}) written to {options.gguf}")
        _verified("--gguf", lambda: check_gguf(options.gguf, reference, llama=options.verify), log)
    if options.ollama:
        _export_ollama(options, session, reference, system, show_progress, log)


def _export_ollama(options, session, reference, system, show_progress, log) -> None:
    """--ollama DIR: DIR/model.gguf (the merged model, --gguf-type, read back and checked as
    --gguf's is) and DIR/Modelfile."""
    from .gguf import find_sentencepiece_model, write_gguf
    from .ollama import GGUF_NAME, MODELFILE_NAME, write_ollama
    from .verify import check_gguf

    spm = find_sentencepiece_model([session.info.directory, session.info.base_model])

    def write_model(path: Path) -> None:
        write_gguf(session.model, session.tokenizer, path, options.gguf_type,
                   name=Path(options.ollama).name, sentencepiece_model=spm,
                   show_progress=show_progress, warn=log)

    with writing("--ollama", options.ollama):
        write_ollama(session, options.ollama, write_model=write_model, system=system)
    log(f"Ollama folder written to {options.ollama} ({GGUF_NAME}, {options.gguf_type}; {MODELFILE_NAME}): "
        f"ollama create NAME -f {Path(options.ollama) / MODELFILE_NAME}")
    _verified("--ollama", lambda: check_gguf(Path(options.ollama) / GGUF_NAME, reference, llama=options.verify), log)


def _export_mlx_adapter(options, session, log) -> None:
    """--mlx-adapter DIR: the adapter in mlx-lm's format, for the base the adapter records."""
    from .mlx_adapter import QLORA_NOTE, write_mlx_adapter

    with writing("--mlx-adapter", options.mlx_adapter):
        write_mlx_adapter(session.model, options.mlx_adapter, base_model=session.info.base_model)
    if session.info.quantized:
        log(QLORA_NOTE)
    log(f"mlx-lm adapter written to {options.mlx_adapter}: mlx_lm.generate --model {session.info.base_model} "
        f"--adapter-path {options.mlx_adapter} --prompt ...")


def push(options: ExportOptions, adapter_dir, log: Log = print) -> None:
    """--push-to-hub: the export written in this command (one at most), else the adapter folder's files."""
    from ..hub_push import adapter_files, hub_token, push as upload

    written = options.gguf or options.gguf_lora or options.merge or options.ollama or options.mlx_adapter
    if written:
        path, files = Path(written), None
    else:
        path, files = Path(adapter_dir), adapter_files(adapter_dir)
    log(f"--push-to-hub: uploading {path} to {options.push_to_hub}")
    url = upload(options.push_to_hub, path, token=hub_token(), private=options.private, files=files)
    log(f"pushed to {url}")
