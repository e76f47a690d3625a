"""`RunConfig`: every setting of a training run, declared once.

Each field carries its default, help text, valid range and flag spellings (`phicore.settings`).
`train.py`'s command line, `--config` files and the Python API (`phicore.finetune`) all build
one of these; it checks itself when built, so a RunConfig that exists is valid and the rest of
the run trusts it. A run saves it as `config` in OUT/training_config.json and as
run_config.json in every checkpoint; either file given back to `--config` reproduces the run.

    config = RunConfig(model="tiny-phi-2", data="examples/humor.jsonl", out="out/demo", max_steps=20)
    config = RunConfig.from_command_line(["--model", "phi-2", "--data", "humor.jsonl"])

Aliases: the seed projects' snake_case spellings (every flag works in snake_case) and the
Hugging Face Trainer / TRL names people already type (`--learning_rate`, `--num_train_epochs`,
`--per_device_train_batch_size`, `--max_seq_length`, `--save_steps`, `--load_in_4bit`, `--bf16`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from ..data import FORMATS
from ..settings import (SettingsError, build_parser, check, cli_values, from_sources, normalize_argv,
                        read_config_file, setting, settings_of, to_dict)
from ..weights import DTYPE_NAMES
from ..compile import COMPILE_MODES
from .schedule import SCHEDULES

DEFAULT_LR = 2e-4  # real models; the random-weight tiny presets declare their own (phicore.tiny)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CONFIG_FLAG_HELP = ("read settings from a TOML, JSON or YAML file (flat `name = value`; an earlier run's "
                    "training_config.json works too); flags given here override it")


class UsageError(Exception):
    """Bad input found while preparing a run beyond the settings themselves (a data file, the model
    folder, the output folder, a checkpoint): printed as one line, exit code 2."""


@dataclasses.dataclass
class RunConfig:
    """The settings of one fine-tuning run (see the module docstring)."""

    # -- model
    model: str = setting("phi-2", "base model: a preset (phi-2, phi-3-mini-4k, phi-3-mini-128k, phi-3.5-mini, "
                         "phi-3-medium-4k, phi-4-mini, phi-4; offline demos tiny-phi-2, tiny-phi-3), a hub id or a "
                         "local folder", section="model", aliases=("--model_name_or_path",))

    # -- data
    data: Optional[str] = setting(None, "training data: a file (.jsonl, .json, .csv, .tsv, .xlsx, .parquet, "
                                  ".jsonl.gz, .json.gz), a Hugging Face hub dataset id ORG/NAME, or a folder holding "
                                  "a downloaded dataset repository (required; a local path wins over a hub id)",
                                  section="data", aliases=("--dataset_path",), metavar="FILE|ID",
                                  resumable="free")  # on resume its contents are compared, by sha256
    data_split: str = setting("train", "the split of a hub dataset or dataset folder to train on; its validation "
                              "(else test) split, when it has one and no --val-data is given, is the validation "
                              "set instead of --val-split", section="data", metavar="SPLIT")
    data_config: Optional[str] = setting(None, "the configuration of a hub dataset that declares several",
                                         section="data", metavar="NAME")
    data_revision: Optional[str] = setting(None, "branch, tag or commit of a hub dataset (default: main)",
                                           section="data", metavar="REV",
                                           resumable="free")  # the commit it resolves to is compared
    data_filter: Optional[str] = setting(None, "keep only the rows whose FIELD equals VALUE, before tokenising "
                                         "(repeatable: all must hold; a.b reaches into nested objects)",
                                         section="data", many=True, metavar="FIELD=VALUE")
    data_limit: Optional[int] = setting(None, "use only the first N rows (conversations) left after "
                                        "--data-filter", section="data", range="[1, inf)")
    format: Optional[str] = setting(None, "force a record format instead of detecting it from the fields",
                                    section="data", choices=FORMATS)
    prompt_field: Optional[str] = setting(None, "the column (CSV/TSV/XLSX) or key (JSON/JSONL records) that holds the "
                                          "prompt, for names not detected (the columns not mapped are ignored)",
                                          section="data", metavar="NAME")
    response_field: Optional[str] = setting(None, "the column (CSV/TSV/XLSX) or key (JSON/JSONL records) that holds "
                                            "the response", section="data", metavar="NAME")
    text_field: Optional[str] = setting(None, "the column (CSV/TSV/XLSX) or key (JSON/JSONL records) that holds the "
                                        "whole text: plain records, all of it trained on", section="data",
                                        metavar="NAME")
    template: Optional[str] = setting(None, 'prompt format: "instruct", "chat", or a custom string with {prompt} '
                                      "and {response} (default: the model's chat template, else instruct)",
                                      section="data")
    val_data: Optional[str] = setting(None, "separate validation file, dataset folder or hub dataset id (its "
                                      "validation, else test, else train split) (default: --val-split of the "
                                      "training data)", section="data", metavar="FILE|ID",
                                      resumable="free")  # contents compared too
    val_split: float = setting(0.1, "fraction of the data held out for validation (seeded)", section="data",
                               range="[0, 1)")
    max_length: int = setting(1024, "tokens per example; longer rows are cut", section="data", range="[2, inf)",
                              aliases=("--max_seq_length",))
    train_on_prompt: bool = setting(False, "compute the loss on prompt tokens too", section="data")
    pack: bool = setting(False, "pack several examples per sequence (block-diagonal attention)", section="data")
    data_cache: Optional[str] = setting(None, "tokenised dataset cache folder (default: $PHICORE_CACHE_DIR or "
                                        "~/.cache/phicore/datasets)", section="data", metavar="DIR", resumable="free")

    # -- LoRA
    lora_r: int = setting(16, "LoRA rank", section="LoRA", range="[1, inf)")
    lora_alpha: float = setting(32.0, "LoRA alpha (the adapter is scaled by alpha / r)", section="LoRA",
                                range="(0, inf)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA inputs", section="LoRA", range="[0, 1)")
    targets: str = setting("all-linear", "module names (comma- or space-separated), or all-linear (never lm_head)",
                           section="LoRA", aliases=("--target_modules",), many=True)
    use_rslora: bool = setting(False, "scale by alpha / sqrt(r) (rsLoRA)", section="LoRA")
    use_dora: bool = setting(False, "weight-decomposed LoRA (DoRA)", section="LoRA")

    # -- quantisation
    quantize: Optional[str] = setting(None, "QLoRA: hold the frozen base in 4-bit NF4", section="quantisation",
                                      choices=("nf4",), switches={"--load_in_4bit": "nf4"})
    double_quant: bool = setting(True, "quantise the NF4 scales again (bitsandbytes' double quantisation)",
                                 section="quantisation")
    compute_dtype: Optional[str] = setting(None, "dtype the NF4 layers compute in (default: --dtype's); needs "
                                           "--quantize", section="quantisation", choices=DTYPE_NAMES)

    # -- optimisation
    lr: Optional[float] = setting(None, f"peak learning rate (default {DEFAULT_LR}; the tiny presets' own, 2e-3)",
                                  section="optimisation", range="(0, 1]", aliases=("--learning_rate",))
    batch_size: int = setting(4, "examples per micro-batch (per process under torchrun), or auto: the largest that "
                              "the memory planner fits in the device's free memory less --memory-margin (on CUDA "
                              "confirmed by a probe step, stepping down on out-of-memory); a run resumed with "
                              "auto keeps the batch it chose", section="optimisation", range="[1, inf)",
                              aliases=("--per_device_train_batch_size",), words=("auto",))  # int, or "auto"
    grad_accum: int = setting(1, "micro-batches per optimizer step", section="optimisation", range="[1, inf)",
                              aliases=("--gradient_accumulation_steps",))
    effective_batch_size: Optional[int] = setting(None, "rows per optimizer step: --grad-accum becomes this / "
                                                  "--batch-size (which must divide it; with --batch-size auto, the "
                                                  "largest fitting divisor), so the training does not depend on the "
                                                  "machine's memory", section="optimisation", range="[1, inf)")
    weight_decay: float = setting(0.0, "AdamW weight decay", section="optimisation", range="[0, inf)")
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 disables)", section="optimisation",
                                   range="[0, inf)")
    seed: int = setting(42, "seed for data order, validation split, LoRA init and dropout", section="optimisation",
                        range="[0, 4294967296)")

    # -- schedule
    epochs: float = setting(3.0, "passes over the training data", section="schedule", range="(0, inf)",
                            aliases=("--num_train_epochs",), resumable="schedule")
    max_steps: Optional[int] = setting(None, "optimizer steps (overrides --epochs)", section="schedule",
                                       range="[1, inf)", resumable="schedule")
    warmup_ratio: float = setting(0.05, "warmup as a fraction of the steps", section="schedule", range="[0, 1)")
    warmup_steps: int = setting(0, "warmup steps (overrides --warmup-ratio when above 0)", section="schedule",
                                range="[0, inf)")
    scheduler: str = setting("cosine", "learning-rate decay after warmup", section="schedule", choices=SCHEDULES)

    # -- evaluation
    eval_every: Optional[int] = setting(None, "evaluate every N steps (default: once an epoch)", section="evaluation",
                                        range="[1, inf)", aliases=("--eval_steps",), resumable="free")
    early_stopping_patience: Optional[int] = setting(None, "stop after N evaluations without improvement",
                                                     section="evaluation", range="[1, inf)", resumable="free")

    # -- checkpoints
    save_every: Optional[int] = setting(None, "write a checkpoint every N steps (default: only on Ctrl-C and "
                                        "--stop-after)", section="checkpoints", range="[1, inf)",
                                        aliases=("--save_steps",), resumable="free")
    keep_last: int = setting(2, "checkpoints to keep (0 keeps every one)", section="checkpoints", range="[0, inf)",
                             resumable="free")
    resume: Optional[str] = setting(None, "continue from a checkpoint folder, or 'auto' for the latest intact one in "
                                    "--out (a finished run: its outputs are checked, nothing is retrained)",
                                    section="checkpoints", aliases=("--resume_from_checkpoint",), saved=False,
                                    resumable="free")
    stop_after: Optional[int] = setting(None, "write a checkpoint and stop once this many steps are done (job time "
                                        "limits); --resume auto continues", section="checkpoints", range="[1, inf)",
                                        saved=False, resumable="free")

    # -- device and precision
    device: Optional[str] = setting(None, "cpu, cuda, cuda:1, mps (default: the best available)", section="device",
                                    resumable="free")
    dtype: Optional[str] = setting(None, "dtype of the base weights (default: fp32 on CPU and MPS, bf16 on CUDA)",
                                   section="device", choices=DTYPE_NAMES)
    precision: str = setting("auto", "autocast precision (auto: bf16 or fp16 on CUDA, fp32 elsewhere)",
                             section="device", choices=PRECISIONS, switches={"--bf16": "bf16", "--fp16": "fp16"})
    grad_checkpointing: bool = setting(True, "recompute each decoder layer in backward to save memory",
                                       section="device", aliases=("--gradient_checkpointing",), resumable="free")
    offload_checkpoints: bool = setting(False, "with --grad-checkpointing: hold each decoder layer's checkpointed "
                                        "input in pinned CPU memory until backward instead of on the GPU (saves "
                                        "layers x tokens x hidden x 2 bytes, ~0.4 GB for Phi-3-mini at 2048 tokens; "
                                        "costs two PCIe copies of each, overlapped)", section="device",
                                        resumable="free")
    keep_host_memory: bool = setting(True, "on CPU (Linux): keep freed large blocks in the process for the next "
                                     "step instead of faulting fresh pages in (phicore/host_memory.py): QLoRA steps "
                                     "1.3-1.5x faster at Phi-3 widths, resident memory ~20 % higher",
                                     section="device", resumable="free")
    fsdp: bool = setting(False, "under torchrun: shard the frozen base and the adapter across the GPUs with FSDP2 "
                         "(models that do not fit one GPU); not with --quantize", section="device")
    compile: bool = setting(False, "torch.compile the decoder layers (phicore/compile.py), same losses as without "
                            "(dropout included); the first step compiles (~18 s for a small model on a CPU thread, "
                            "once more for a new batch length): pays on long runs (CPU training 1.5x faster at the "
                            "small bench shape), not on a few dozen steps", section="device",
                            aliases=("--torch_compile",), resumable="free")
    compile_mode: str = setting("default", "with --compile: torch.compile's mode; reduce-overhead adds CUDA graphs "
                                "(for GPU steps bound by kernel launches), max-autotune tunes GEMMs (compiles for "
                                "minutes)", section="device", choices=COMPILE_MODES, resumable="free")

    # -- memory
    plan: bool = setting(False, "print the memory plan of this run (every term, its formula, the total against the "
                         "device's free memory) and exit without training", section="memory", saved=False,
                         resumable="free")
    device_memory: Optional[float] = setting(None, "plan for this many GiB instead of the device's free memory "
                                             "(another machine; a limit of your own)", section="memory",
                                             range="(0, inf)", metavar="GIB", saved=False, resumable="free")
    memory_margin: float = setting(0.1, "fraction of the memory --batch-size auto and --plan keep free",
                                   section="memory", range="[0, 1)", resumable="free")

    # -- output
    out: str = setting("out", "output folder: adapter, checkpoints, metrics, training_config.json", section="output",
                       aliases=("--output_dir",), metavar="DIR", resumable="free")
    quiet: bool = setting(False, "no progress bar", section="output", resumable="free")
    overwrite: bool = setting(False, "start a new run in an --out that holds a finished run or checkpoints; the "
                              "earlier run's files are set aside, and deleted only once the new run has finished",
                              section="output", aliases=("--overwrite_output_dir",), saved=False, resumable="free")
    debug: bool = setting(False, "show the Python traceback of an error too, not only its one line",
                          section="output", saved=False, resumable="free")
    push_to_hub: Optional[str] = setting(None, "once the run has finished, upload the adapter, tokenizer, README.md "
                                         "model card, training_config.json and metrics to this Hugging Face hub "
                                         "model repo (token: HF_TOKEN or the saved `hf auth login`)",
                                         section="output", metavar="REPO_ID", saved=False, resumable="free")
    private: bool = setting(False, "--push-to-hub: create the repo private", section="output", saved=False,
                            resumable="free")

    def __post_init__(self):
        if self.lr is None:  # derived once here, so the saved config names the rate the run used
            from ..tiny import TINY_PRESETS

            self.lr = TINY_PRESETS[self.model]["default_lr"] if self.model in TINY_PRESETS else DEFAULT_LR
        check(self)
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Settings that are valid alone but not together."""
        if self.data is None and not self.plan:
            raise SettingsError("--data is required (the training data file)", field="data")
        if self.effective_batch_size is not None:
            if self.batch_size != "auto" and self.effective_batch_size % self.batch_size:
                raise SettingsError(f"--effective-batch-size {self.effective_batch_size} is not a multiple of "
                                    f"--batch-size {self.batch_size}", field="effective_batch_size")
            implied = None if self.batch_size == "auto" else self.effective_batch_size // self.batch_size
            if self.grad_accum not in (1, implied):  # a saved config holds the implied one: that agrees
                raise SettingsError("--effective-batch-size sets --grad-accum (effective / batch size); give one of "
                                    "them", field="effective_batch_size")
            if implied is not None:
                self.grad_accum = implied
        from ..data.selection import parse_filters

        try:
            parse_filters(self.data_filter)
        except ValueError as err:
            raise SettingsError(str(err), field="data_filter") from None
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except RuntimeError:
                raise SettingsError(f"--device must be cpu, cuda, cuda:N or mps, got {self.device!r}",
                                    field="device") from None
        if self.offload_checkpoints and not self.grad_checkpointing:
            raise SettingsError("--offload-checkpoints needs --grad-checkpointing (it offloads the checkpointed "
                                "layer inputs)", field="offload_checkpoints")
        if self.offload_checkpoints and self.fsdp:
            raise SettingsError("--offload-checkpoints does not work with --fsdp (FSDP2 gathers each layer's "
                                "parameters inside its forward, out of the offloaded checkpoint's sight); leave out "
                                "one of them", field="offload_checkpoints")
        if self.fsdp and self.quantize:
            raise SettingsError(f"--fsdp cannot shard a quantised base (--quantize {self.quantize}): FSDP2 shards "
                                "floating-point parameters and a 4-bit base is packed bytes. For QLoRA on several "
                                "GPUs leave out --fsdp (data parallel: each GPU holds the whole 4-bit base)",
                                field="fsdp")
        if self.resume is not None and self.overwrite:
            raise SettingsError("give --resume (continue the run in --out) or --overwrite (replace it), not both",
                                field="overwrite")
        if self.compute_dtype is not None and self.quantize is None:
            raise SettingsError("--compute-dtype sets the dtype NF4 layers compute in: it needs --quantize nf4 "
                                "(--dtype sets the dtype of a dense base)", field="compute_dtype")
        from ..hub_push import check_push_flags

        check_push_flags(self.push_to_hub, self.private)

    # -- resuming
    def changes_from(self, saved: dict) -> tuple:
        """Compare with the settings a checkpoint (or finished run) saved: (refused, allowed),
        each a list of (flag, saved value, value now). Settings declared resumable="same" change
        the training trajectory and are refused; "free" ones (where files go, how often to save
        or evaluate, memory savings) and "schedule" ones (--max-steps, --epochs: how long the
        run is) are allowed."""
        refused, allowed = [], []
        for spec in settings_of(type(self)):
            if not spec.saved or spec.name not in saved:
                continue
            old, new = saved[spec.name], getattr(self, spec.name)
            if old != new:
                (refused if spec.resumable == "same" else allowed).append((spec.flag, old, new))
        return refused, allowed

    # -- conversions
    def to_dict(self) -> dict:
        """The run's settings as saved (JSON-ready; `resume` and `stop_after`, which describe one
        invocation, are left out)."""
        return to_dict(self)

    @classmethod
    def from_file(cls, path, **overrides) -> "RunConfig":
        """A config file's settings, `overrides` on top."""
        return from_sources(cls, read_config_file(cls, path), overrides, source=str(path))

    @classmethod
    def parser(cls, prog: Optional[str] = None, description: str = ""):
        return build_parser(cls, prog=prog, description=description, usage="%(prog)s [--config FILE] --data FILE "
                            "[--model MODEL] [--out DIR] [options]", extra=[
            (("--config",), dict(metavar="FILE", help=CONFIG_FLAG_HELP))],
            epilog="Every flag is also accepted in snake_case (--lora_r, --max_grad_norm).")

    @classmethod
    def from_command_line(cls, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None,
                          description: str = "") -> "RunConfig":
        """Parse flags (and --config FILE under them). argparse's own errors exit 2 with one line;
        a bad value raises SettingsError naming the flag (or the file it came from)."""
        import sys

        parser = cls.parser(prog, description)
        argv = sys.argv[1:] if argv is None else list(argv)
        namespace = parser.parse_args(normalize_argv(parser, argv))
        config_file = getattr(namespace, "config", None)
        file_values = read_config_file(cls, config_file) if config_file else {}
        return from_sources(cls, file_values, cli_values(cls, namespace), source=config_file or "")
