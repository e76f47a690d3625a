"""Datasets by name: `--data ORG/NAME` (a Hugging Face hub dataset) or a folder holding a
downloaded dataset repository -> the `DataSelection` of one configuration's split.

Which files are a split follows the hub's conventions, as the `datasets` library reads them:

1. the dataset card's `configs:` (README.md YAML): each configuration's `data_files`, a pattern
   or list of patterns per split (`- split: train` / `path: data/train-*`), or one pattern for
   a lone train split; `data_dir` as the base folder; `default: true` marks the default;
2. otherwise split names in file and folder names: a path whose name parts (split at
   `-._ 0-9/`) include train/training, validation/valid/val/dev or test/testing/eval/evaluation
   belongs to that split (`data/train-00000-of-00001.parquet`, `test/0.jsonl`); when no file
   names a split, every data file is the train split.

Only data files are fetched: .jsonl, .json, .csv, .tsv, .parquet, .jsonl.gz, .json.gz (and the
card, README.md, for its `configs:`). They go to the hub's own cache (`HF_HUB_CACHE`, shared
with every other tool); a later run finds them there, and without a network (or with
`HF_HUB_OFFLINE=1`) the cached snapshot is used. A commit sha given to `--data-revision` that is
cached is used without asking the hub at all.

A path that exists locally always wins over a hub id; a name with a data-file suffix
(`data/train.jsonl`) is always a path. Every problem is a `DataError` with one line naming the
dataset and what to do: offline and not cached, no such dataset (or a private one), a gated
dataset without access, no such revision, configuration or split, no readable data files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .formats import DataError
from .selection import PYARROW_HINT, SUFFIXES, DataSelection, data_suffix, local_selection

SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}
VALIDATION_SPLITS = ("validation", "test")  # a dataset's held-out split, in order of preference
CARD = "README.md"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SHA = re.compile(r"[0-9a-f]{40}")
_PARTS = re.compile(r"[-._ 0-9/]+")


def is_hub_id(spec: str) -> bool:
    """ORG/NAME, not an existing local path, and not named like a data file."""
    return bool(_HUB_ID.fullmatch(spec)) and not Path(spec).exists() and data_suffix(spec) not in SUFFIXES \
        and Path(spec).suffix.lower() != ".xlsx"


def is_dataset_folder(spec: str) -> bool:
    return Path(spec).is_dir()


@dataclass
class Listing:
    """A dataset repository's files at one revision: repo path -> local path (None until fetched)."""

    dataset: str  # hub id, or the folder
    revision: str  # the commit sha, or "local" for a folder
    files: dict
    fetch: object = None  # repo path -> local path (the hub download); None for a folder
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------- listing

def _hub_errors(dataset: str, revision: Optional[str], flag: str):
    """Map huggingface_hub's exceptions to one-line DataErrors naming the dataset."""
    from huggingface_hub import errors

    def convert(err: Exception) -> DataError:
        where = f"{flag} {dataset}"
        if isinstance(err, errors.GatedRepoError):
            return DataError(f"{where}: a gated dataset: accept its terms at https://huggingface.co/datasets/"
                             f"{dataset} and log in (hf auth login, or set HF_TOKEN)")
        if isinstance(err, errors.RevisionNotFoundError):
            return DataError(f"{where}: no revision {revision!r} (--data-revision): give a branch, tag or commit "
                             "of the dataset")
        if isinstance(err, errors.RepositoryNotFoundError):
            return DataError(f"{where}: no such local file or folder, and no such dataset on the Hugging Face hub "
                             "(or a private one: log in with hf auth login, or set HF_TOKEN); check the name")
        if isinstance(err, errors.LocalEntryNotFoundError):
            return DataError(f"{where}: not in the local hub cache{f' at revision {revision}' if revision else ''}, "
                             "and the hub cannot be reached (offline, or HF_HUB_OFFLINE=1): run once with a "
                             "network to download it, or give a local file or folder")
        if isinstance(err, errors.HfHubHTTPError):
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            return DataError(f"{where}: the hub refused the request ({first}); try again, or give a local file")
        return DataError(f"{where}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")

    return convert


def list_hub_dataset(dataset: str, revision: Optional[str], flag: str = "--data") -> Listing:
    """The files of a hub dataset at `revision` (default main): asked of the hub, or read from
    the cached snapshot when the hub cannot be reached (or the revision is a cached commit)."""
    from huggingface_hub import HfApi, errors, hf_hub_download, snapshot_download

    convert = _hub_errors(dataset, revision, flag)

    def cached() -> Listing:
        folder = Path(snapshot_download(dataset, repo_type="dataset", revision=revision, local_files_only=True))
        files = {p.relative_to(folder).as_posix(): None for p in sorted(folder.rglob("*")) if p.is_file()}
        return Listing(dataset, folder.name, files, notes=[f"{flag} {dataset}: read from the hub cache (revision "
                                                           f"{folder.name[:12]}), not the hub"])

    def fetch_from(sha: str, local_only: bool):
        # Online, files are fetched by the revision asked for (main by default), not by the sha: the
        # hub cache then records where the branch points (refs/main), which an offline run needs.
        asked = sha if local_only or (revision and _SHA.fullmatch(revision)) else (revision or "main")

        def fetch(name: str) -> str:
            try:
                path = hf_hub_download(dataset, name, repo_type="dataset", revision=asked, local_files_only=local_only)
            except Exception as err:
                raise convert(err) from None
            if Path(path).parents[len(Path(name).parts) - 1].name != sha:  # snapshots/SHA/NAME
                raise DataError(f"{flag} {dataset}: {asked} moved while it was downloaded (now not {sha[:12]}); "
                                "run again, or pin a commit with --data-revision")
            return path
        return fetch

    if revision and _SHA.fullmatch(revision):  # a pinned commit that is cached: no request at all
        try:
            listing = cached()
            listing.fetch = fetch_from(listing.revision, True)
            return listing
        except Exception:
            pass
    try:
        info = HfApi().dataset_info(dataset, revision=revision, files_metadata=True)
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError) as err:
        raise convert(err) from None  # the hub's answer: the cache cannot make it right
    except Exception as err:  # offline, no network, the hub down: the cached snapshot, if any
        try:
            listing = cached()
        except Exception:
            raise convert(err if isinstance(err, errors.HfHubHTTPError) else
                          errors.LocalEntryNotFoundError(str(err))) from None
        listing.fetch = fetch_from(listing.revision, True)
        return listing
    files = {s.rfilename: None for s in info.siblings or []}
    return Listing(dataset, info.sha, files, fetch=fetch_from(info.sha, False))


def list_folder(folder: str) -> Listing:
    """A downloaded dataset repository on disk (hidden folders such as .git, .cache left out)."""
    root = Path(folder)
    files = {p.relative_to(root).as_posix(): str(p) for p in sorted(root.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}
    return Listing(str(folder), "local", files)


# ----------------------------------------------------------------------------- configs and splits

def _glob(pattern: str):
    """A `datasets`-style pattern as a regex: `*` within a folder, `**` across folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _card_configs(listing: Listing) -> list:
    """The `configs:` list of the dataset card's YAML (empty when there is none)."""
    if CARD not in listing.files:
        return []
    from huggingface_hub.repocard import metadata_load

    path = listing.files[CARD] or listing.fetch(CARD)
    try:
        meta = metadata_load(path) or {}
    except Exception as err:  # a card whose YAML does not parse: no configs, as the hub shows it
        listing.notes.append(f"{listing.dataset}: {CARD}: YAML not readable ({type(err).__name__}); configs ignored")
        return []
    configs = meta.get("configs")
    return [c for c in configs if isinstance(c, dict) and "config_name" in c] if isinstance(configs, list) else []


def _patterns_by_split(data_files) -> dict:
    """A card's `data_files` (a pattern, a list, a list of {split, path}, a {split: path} map)
    as {split: [patterns]}."""
    as_list = lambda v: [v] if isinstance(v, str) else [str(x) for x in (v or [])]  # noqa: E731
    if isinstance(data_files, dict):
        return {str(k): as_list(v) for k, v in data_files.items()}
    if isinstance(data_files, list) and data_files and all(isinstance(x, dict) for x in data_files):
        out: dict = {}
        for item in data_files:
            out.setdefault(str(item.get("split", "train")), []).extend(as_list(item.get("path")))
        return out
    return {"train": as_list(data_files)}


def _split_of(path: str) -> Optional[str]:
    words = set(_PARTS.split(path.lower()))
    return next((split for split, names in SPLIT_WORDS.items() if words & set(names)), None)


def infer_splits(paths: list) -> dict:
    """{split: [paths]} from file and folder names (see the module docstring)."""
    splits: dict = {}
    for path in paths:
        split = _split_of(path)
        if split is not None:
            splits.setdefault(split, []).append(path)
    return splits or ({"train": list(paths)} if paths else {})


def dataset_splits(listing: Listing, config: Optional[str], flag: str = "--data") -> tuple:
    """(config name or None, {split: [repo paths]}) of the chosen configuration."""
    data = [p for p in listing.files if data_suffix(p) in SUFFIXES and p != CARD]
    where = f"{flag} {listing.dataset}"
    configs = _card_configs(listing)
    if not configs:
        if config is not None:
            raise DataError(f"{where}: declares no configurations (no configs: in its {CARD}); leave out "
                            f"--data-config {config}")
        chosen, splits = None, infer_splits(data)
    else:
        names = [str(c["config_name"]) for c in configs]
        if config is None:
            default = [c for c in configs if c.get("default")] or \
                      [c for c in configs if c["config_name"] == "default"] or (configs if len(configs) == 1 else [])
            if not default:
                raise DataError(f"{where}: has {len(names)} configurations ({', '.join(names)}); choose one with "
                                "--data-config NAME")
            entry = default[0]
        elif config in names:
            entry = configs[names.index(config)]
        else:
            raise DataError(f"{where}: no configuration {config!r} (--data-config); it has: {', '.join(names)}")
        chosen = str(entry["config_name"])
        base = str(entry.get("data_dir") or "").strip("/")
        if entry.get("data_files") is None:
            splits = infer_splits([p for p in data if not base or p.startswith(base + "/")])
        else:
            splits = {}
            for split, patterns in _patterns_by_split(entry["data_files"]).items():
                regexes = [_glob(f"{base}/{p}" if base else p) for p in patterns]
                splits[split] = [p for p in data if any(r.fullmatch(p) for r in regexes)]
    if not any(splits.values()):
        found = ", ".join(list(listing.files)[:8]) or "no files"
        raise DataError(f"{where}: no data files phicore reads ({', '.join(SUFFIXES)}) in the dataset"
                        f"{f' configuration {chosen}' if chosen else ''} (found: {found})")
    return chosen, {k: sorted(v) for k, v in splits.items() if v}


# ----------------------------------------------------------------------------- the selection

@dataclass
class HubSplits:
    """A resolved dataset: its listing, configuration and splits, fetched on demand."""

    listing: Listing
    config: Optional[str]
    splits: dict
    flag: str = "--data"

    def selection(self, split: str, filters: tuple = (), limit: Optional[int] = None) -> DataSelection:
        """The split's files (downloaded now, to the hub cache) as a selection."""
        where = f"{self.flag} {self.listing.dataset}"
        if split not in self.splits:
            raise DataError(f"{where}: no split {split!r} (--data-split){self._in_config()}; it has: "
                            f"{', '.join(self.splits)}")
        names = self.splits[split]
        if all(data_suffix(n) == ".parquet" for n in names):
            try:
                import pyarrow.parquet  # noqa: F401
            except ImportError:
                raise DataError(f"{where}: its {split} split is Parquet files, which need pyarrow: "
                                f"{PYARROW_HINT}") from None
        paths = [self.listing.files[n] or self.listing.fetch(n) for n in names]
        identity = {"dataset": self.listing.dataset, "revision": self.listing.revision, "config": self.config,
                    "split": split}
        label = f"{self.listing.dataset}" + (f" [{self.config}]" if self.config else "") + f" ({split})"
        return DataSelection(name=label, files=[Path(p) for p in paths], filters=tuple(filters), limit=limit,
                             identity=identity, labels=[f"{self.listing.dataset}/{n}" for n in names])

    def held_out_split(self, training: str) -> Optional[str]:
        """The dataset's validation (else test) split, unless that is the one trained on."""
        return next((s for s in VALIDATION_SPLITS if s in self.splits and s != training), None)

    def _in_config(self) -> str:
        return f" in configuration {self.config}" if self.config else ""


def resolve_dataset(spec: str, *, config: Optional[str] = None, revision: Optional[str] = None,
                    flag: str = "--data") -> HubSplits:
    """A hub id or a dataset folder -> its configuration's splits (files listed, not fetched)."""
    if is_dataset_folder(spec):
        if revision is not None:
            raise DataError(f"{flag} {spec}: a local folder has no revisions; leave out --data-revision")
        listing = list_folder(spec)
    else:
        listing = list_hub_dataset(spec, revision, flag)
    chosen, splits = dataset_splits(listing, config, flag)
    return HubSplits(listing, chosen, splits, flag)


# ----------------------------------------------------------------------------- a run's data

@dataclass
class DataSources:
    """What a run trains and validates on: each a data file's path (str) or a `DataSelection`;
    `validation` None means --val-split of the training data. `notes`: lines for the log."""

    train: object
    validation: object = None
    notes: list = field(default_factory=list)

    @staticmethod
    def name(source) -> str:
        return source.name if isinstance(source, DataSelection) else str(source)

    def describe(self) -> dict:
        """The resolved datasets (hub id, revision, config, split, files and their sha256,
        filters, limit) of the selections among them, JSON-ready; {} for plain files."""
        return {role: source.describe() for role, source in (("data", self.train), ("val_data", self.validation))
                if isinstance(source, DataSelection)}


def _describe_selection(flag: str, selection: DataSelection) -> str:
    ident = selection.identity
    files = ", ".join(selection.labels or map(str, selection.files))
    parts = [f"revision {ident['revision'][:12]}" if ident.get("revision") not in (None, "local") else "local folder",
             f"config {ident['config']}" if ident.get("config") else "",
             f"split {ident['split']}", f"{len(selection.files)} file{'s' * (len(selection.files) > 1)} ({files})"]
    if selection.filters:
        parts.append(f"--data-filter {','.join(map(str, selection.filters))}")
    if selection.limit is not None:
        parts.append(f"--data-limit {selection.limit}")
    return f"{flag} {ident['dataset']}: " + ", ".join(p for p in parts if p)


def data_sources(data: str, val_data: Optional[str] = None, *, split: str = "train", config: Optional[str] = None,
                 revision: Optional[str] = None, filters: tuple = (), limit: Optional[int] = None) -> DataSources:
    """Resolve --data and --val-data (files, dataset folders or hub ids) into a run's sources.

    A hub dataset or folder trains on `split` of `config`; without `val_data`, its validation
    (else test) split is the validation set. `val_data` given as a dataset uses its validation,
    else test, else train split, and `config`/`revision` only when it names --data's dataset.
    Filters and the limit apply to both. DataError: one line."""
    notes: list = []

    def hub(spec: str, flag: str, choose) -> tuple:
        same = flag == "--data" or spec == data  # --data-config/--data-revision name --data's dataset
        splits = resolve_dataset(spec, config=config if same else None, revision=revision if same else None,
                                 flag=flag)
        notes.extend(splits.listing.notes)
        return splits, choose(splits)

    def plain(spec: str):
        return local_selection(spec, filters, limit) or spec

    if is_hub_id(data) or is_dataset_folder(data):
        splits, _ = hub(data, "--data", lambda s: split)
        train = splits.selection(split, filters, limit)
        notes.append(_describe_selection("--data", train))
        held_out = splits.held_out_split(split) if val_data is None else None
        validation = splits.selection(held_out, filters, limit) if held_out else None
        if validation is not None:
            notes.append(f"validation: the dataset's {held_out} split (instead of --val-split)")
    else:
        given = [flag for flag, value in (("--data-split", split != "train"), ("--data-config", config),
                                          ("--data-revision", revision)) if value]
        if given:
            raise DataError(f"--data {data}: {', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to a hub "
                            "dataset (ORG/NAME) or a dataset folder, not to one file")
        train, validation = plain(data), None
    if val_data is not None:
        if is_hub_id(val_data) or is_dataset_folder(val_data):
            val_splits, held = hub(val_data, "--val-data",
                                   lambda s: next((x for x in (*VALIDATION_SPLITS, "train") if x in s.splits), None))
            if held is None:
                raise DataError(f"--val-data {val_data}: no validation, test or train split; it has: "
                                f"{', '.join(val_splits.splits)}")
            validation = val_splits.selection(held, filters, limit)
            notes.append(_describe_selection("--val-data", validation))
        else:
            validation = plain(val_data)
    return DataSources(train, validation, notes)
