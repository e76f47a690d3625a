"""Datasets from the Hugging Face hub by name (phicore/data/hub_data.py, selection.py).

No network: `fake_hub` writes datasets into a hub cache folder laid out as huggingface_hub
writes it (datasets--ORG--NAME/refs/main, snapshots/SHA/...), and the tests read it with
huggingface_hub in offline mode, as `HF_HUB_OFFLINE=1` does. The error cases the hub answers
(unknown, gated, no such revision) patch `HfApi.dataset_info` to raise what the hub raises.

Datasets: an OpenAssistant-trees JSONL, gzipped (English and Spanish trees); a `text` Parquet
(when pyarrow is installed); a CSV with train and validation files; a dataset whose card
declares two configurations; flat OpenAssistant messages (assembled into trees).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from train_runs import run_main  # noqa: E402
from phicore.data import DataError, FieldMap  # noqa: E402
from phicore.data import cache  # noqa: E402
from phicore.data.hub_data import data_sources, is_hub_id, infer_splits  # noqa: E402
from phicore.data.selection import DataSelection, RowFilter, parse_filters  # noqa: E402
from phicore.settings import SettingsError  # noqa: E402
from phicore.train.config import RunConfig  # noqa: E402
from phicore.train.resume import data_changes  # noqa: E402
from phicore.train.config import UsageError  # noqa: E402

FAST = ["--max-length", "64", "--quiet", "--no-grad-checkpointing", "--max-steps", "2", "--batch-size", "2"]
SHA = "0123456789abcdef0123456789abcdef01234567"
TWO_CONFIGS_CARD = """---
license: mit
configs:
- config_name: jokes
  data_files:
  - split: train
    path: jokes/train-*.jsonl
- config_name: chats
  data_dir: chats
  data_files:
  - split: train
    path: "train.jsonl"
  - split: test
    path: "test.jsonl"
---
# Two configurations
"""


def oasst_tree(i: int, lang: str) -> dict:
    """An OpenAssistant tree (the trees export's shape): a prompt, two ranked replies, a follow-up."""
    return {"message_tree_id": f"t{i}", "tree_state": "ready_for_export", "prompt": {
        "message_id": f"m{i}", "text": f"Question {i} ({lang})?", "role": "prompter", "lang": lang, "replies": [
            {"text": f"Worse answer {i}.", "role": "assistant", "lang": lang, "rank": 1, "replies": []},
            {"text": f"Best answer {i}.", "role": "assistant", "lang": lang, "rank": 0, "replies": [
                {"text": "Thanks!", "role": "prompter", "lang": lang, "replies": []}]}]}}


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write_dataset(cache_dir: Path, repo_id: str, files: dict, sha: str = SHA) -> Path:
    """One dataset in the hub cache's layout; `files`: repo path -> bytes. The snapshot folder."""
    repo = cache_dir / ("datasets--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snapshot


def fake_hub(cache_dir: Path) -> Path:
    """The test datasets (see the module docstring) in a hub cache folder."""
    trees = [oasst_tree(i, "en" if i % 3 else "es") for i in range(12)]
    write_dataset(cache_dir, "org/oasst-trees", {"2023-04-12_oasst_ready.trees.jsonl.gz": gzip.compress(jsonl(trees)),
                                                 "README.md": b"# trees\n"})
    qa = "question,answer\n" + "".join(f"What is {i}+1?,{i + 1}\n" for i in range(10))
    qa_val = "question,answer\n" + "".join(f"What is {i}+2?,{i + 2}\n" for i in range(4))
    write_dataset(cache_dir, "org/qa-csv", {"data/train.csv": qa.encode(), "data/validation.csv": qa_val.encode()})
    jokes = [{"prompt": f"Joke {i}?", "response": f"Punchline {i}."} for i in range(6)]
    chats = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}"}]}
             for i in range(6)]
    write_dataset(cache_dir, "org/two-configs", {
        "README.md": TWO_CONFIGS_CARD.encode(), "jokes/train-00000.jsonl": jsonl(jokes),
        "chats/train.jsonl": jsonl(chats), "chats/test.jsonl": jsonl(chats[:2])})
    write_dataset(cache_dir, "org/no-data", {"data/train.arrow": b"\x00" * 16, "README.md": b"# none\n"})
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return cache_dir
    snapshot = write_dataset(cache_dir, "org/cat-memes", {})
    (snapshot / "data").mkdir(parents=True)
    table = pa.table({"text": [f"Cat meme {i}: I can haz {i} cheezburgers" for i in range(10)],
                      "id": list(range(10))})
    pq.write_table(table, snapshot / "data" / "train-00000-of-00001.parquet")
    return cache_dir


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """huggingface_hub reading `fake_hub` offline (HF_HUB_OFFLINE=1 and HF_HUB_CACHE, as set in a shell)."""
    from huggingface_hub import constants

    root = fake_hub(tmp_path / "hub-cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local path named like the hub ids
    return root


def needs_pyarrow():
    pytest.importorskip("pyarrow", reason="pyarrow (the hub extra) is not installed")


def texts(selection: DataSelection, **kw) -> list:
    return [[t.content for t in conv.turns] for conv in selection.conversations(**kw)]


# ----------------------------------------------------------------------------- resolution

def test_hub_ids_and_paths():
    assert is_hub_id("OpenAssistant/oasst1") and is_hub_id("leonvanbokhorst/existential-cat-memes-v1")
    assert not is_hub_id("examples/humor.jsonl")  # a data-file name is a path, existing or not
    assert not is_hub_id("examples") and not is_hub_id("a/b/c") and not is_hub_id("data.csv")
    assert infer_splits(["data/train-00000-of-00002.parquet", "data/validation-00000.parquet", "x/test/0.jsonl",
                         "notes.jsonl"]) == {"train": ["data/train-00000-of-00002.parquet"],
                                             "validation": ["data/validation-00000.parquet"],
                                             "test": ["x/test/0.jsonl"]}
    assert infer_splits(["2023-04-12_oasst_ready.trees.jsonl.gz"]) == {
        "train": ["2023-04-12_oasst_ready.trees.jsonl.gz"]}


def test_oasst_trees_gzipped_filtered_and_limited(hub):
    sources = data_sources("org/oasst-trees", filters=parse_filters("lang=en"), limit=5)
    train = sources.train
    assert train.identity == {"dataset": "org/oasst-trees", "revision": SHA, "config": None, "split": "train"}
    convs = list(train.conversations())
    assert len(convs) == 5  # 8 English trees, the first 5
    assert [t.content for t in convs[0].turns] == ["Question 1 (en)?", "Best answer 1."]  # rank 0, unanswered cut
    assert sources.validation is None  # no validation split: --val-split
    described = sources.describe()["data"]
    assert described["filters"] == ["lang=en"] and described["limit"] == 5 and described["revision"] == SHA
    assert described["files"][0]["path"] == "org/oasst-trees/2023-04-12_oasst_ready.trees.jsonl.gz"
    assert any("split train" in n and "--data-filter lang=en" in n and "--data-limit 5" in n for n in sources.notes)


def test_csv_validation_split_and_two_configurations(hub):
    sources = data_sources("org/qa-csv")
    assert sources.train.identity["split"] == "train" and sources.validation.identity["split"] == "validation"
    assert len(list(sources.validation.conversations())) == 4
    assert any("validation split (instead of --val-split)" in n for n in sources.notes)
    chats = data_sources("org/two-configs", config="chats")
    assert chats.train.identity["config"] == "chats" and chats.validation.identity["split"] == "test"
    assert texts(chats.train)[0] == ["Hi 0", "Hello 0"]
    jokes = data_sources("org/two-configs", config="jokes", limit=2)
    assert texts(jokes.train) == [["Joke 0?", "Punchline 0."], ["Joke 1?", "Punchline 1."]]
    assert jokes.validation is None


def test_text_parquet(hub):
    needs_pyarrow()
    sources = data_sources("org/cat-memes", filters=parse_filters("id=3"))
    convs = list(sources.train.conversations())
    assert len(convs) == 1 and convs[0].plain and convs[0].turns[0].content.startswith("Cat meme 3")
    assert convs[0].source == ("org/cat-memes/data/train-00000-of-00001.parquet", 4)


def test_flat_oasst_messages_are_assembled_into_trees(tmp_path):
    rows = [{"message_id": "a", "parent_id": None, "role": "prompter", "text": "Hi?", "lang": "en", "rank": None},
            {"message_id": "b", "parent_id": "a", "role": "assistant", "text": "Meh.", "lang": "en", "rank": 1},
            {"message_id": "c", "parent_id": "a", "role": "assistant", "text": "Hello!", "lang": "en", "rank": 0},
            {"message_id": "d", "parent_id": None, "role": "prompter", "text": "Hola?", "lang": "es", "rank": None},
            {"message_id": "e", "parent_id": "d", "role": "assistant", "text": "Hola!", "lang": "es", "rank": 0}]
    path = tmp_path / "messages.jsonl"
    path.write_bytes(jsonl(rows))
    selection = DataSelection("messages", [path], filters=parse_filters("lang=en"))
    assert texts(selection) == [["Hi?", "Hello!"]]
    assert texts(DataSelection("messages", [path])) == [["Hi?", "Hello!"], ["Hola?", "Hola!"]]


def test_filters(tmp_path):
    assert parse_filters("lang=en,deleted=false") == (RowFilter("lang", "en"), RowFilter("deleted", "false"))
    assert RowFilter("deleted", "false").keeps({"deleted": False})
    assert RowFilter("meta.lang", "en").keeps({"meta": {"lang": "en"}})
    assert not RowFilter("lang", "en").keeps({"text": "x"})
    with pytest.raises(SettingsError, match="--data-filter 'lang': expected FIELD=VALUE"):
        RunConfig(data="x.jsonl", data_filter="lang")
    config = RunConfig.from_command_line(["--data", "x.jsonl", "--data-filter", "lang=en", "--data-filter", "a=b"])
    assert config.data_filter == "lang=en,a=b"  # repeatable
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl([{"prompt": "p", "response": "r", "lang": "en"}]))
    with pytest.raises(DataError, match=r"no rows left after --data-filter lang=fr \(1 rows read; field 'lang' in 1 "
                                        r"of them\)"):
        list(DataSelection(str(path), [path], filters=parse_filters("lang=fr")).conversations())
    table = tmp_path / "t.csv"
    table.write_text("question,answer,lang\nq1,a1,en\nq2,a2,fr\nq3,a3,en\n")
    got = list(DataSelection(str(table), [table], filters=parse_filters("lang=en")).conversations(
        fields=FieldMap("question", "answer")))
    assert [c.turns[0].content for c in got] == ["q1", "q3"]


# ----------------------------------------------------------------------------- errors: one line each

def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_error_lines(hub, monkeypatch):
    cases = {
        "unknown-offline": (dict(data="org/missing"), "--data org/missing: not in the local hub cache"),
        "revision": (dict(data="org/qa-csv", revision="v9"), "--data org/qa-csv: not in the local hub cache at "
                                                             "revision v9"),
        "split": (dict(data="org/qa-csv", split="dev2"), "--data org/qa-csv: no split 'dev2' (--data-split); it has: "
                                                         "train, validation"),
        "config needed": (dict(data="org/two-configs"), "--data org/two-configs: has 2 configurations (jokes, chats); "
                                                        "choose one with --data-config NAME"),
        "config unknown": (dict(data="org/two-configs", config="x"), "no configuration 'x' (--data-config)"),
        "config none": (dict(data="org/qa-csv", config="x"), "declares no configurations"),
        "no data files": (dict(data="org/no-data"), "--data org/no-data: no data files phicore reads"),
        "split on a file": (dict(data="examples/humor.jsonl", split="test"), "--data-split applies to a hub dataset"),
    }
    for name, (kwargs, expected) in cases.items():
        kwargs["val_data"] = None
        with pytest.raises(DataError) as excinfo:
            data_sources(kwargs.pop("data"), **kwargs)
        assert expected in one_line(excinfo), name


def test_hub_answers_map_to_one_line(hub, monkeypatch):
    from huggingface_hub import HfApi, constants, errors

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    answers = {errors.RepositoryNotFoundError: "no such local file or folder, and no such dataset on the Hugging "
                                               "Face hub",
               errors.GatedRepoError: "a gated dataset: accept its terms at https://huggingface.co/datasets/org/x",
               errors.RevisionNotFoundError: "no revision 'v2' (--data-revision)"}
    for error, expected in answers.items():
        def refuse(self, *args, error=error, **kwargs):
            raised = error.__new__(error)  # as the hub raises it, without an HTTP response to build it from
            Exception.__init__(raised, "the hub's message\nsecond line")
            raise raised

        monkeypatch.setattr(HfApi, "dataset_info", refuse)
        with pytest.raises(DataError) as excinfo:
            data_sources("org/x", revision="v2")
        assert one_line(excinfo).startswith("--data org/x: ") and expected in str(excinfo.value)


def test_parquet_without_pyarrow(hub, monkeypatch):
    needs_pyarrow()  # the fake Parquet file is written with it
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError) as excinfo:
        data_sources("org/cat-memes")
    assert one_line(excinfo) == ("--data org/cat-memes: its train split is Parquet files, which need pyarrow: pip "
                                 "install 'phicore[hub]' (or pip install pyarrow)")


def test_changed_revision_is_named_on_resume():
    source = lambda rev: {"data": {"dataset": "org/x", "revision": rev}}  # noqa: E731
    with pytest.raises(UsageError, match="org/x was at revision aaaaaaaaaaaa, now bbbbbbbbbbbb: pin the old one"):
        data_changes({"data_sha256": "1", "data_sources": source("a" * 40)},
                     {"data_sha256": "2", "data_sources": source("b" * 40)})


# ----------------------------------------------------------------------------- train.py

def test_train_py_on_hub_datasets(hub, bases, tmp_path, capsys, monkeypatch):
    """Each dataset trains; the split, filter and limit are in the log and the run's config; a
    second run reads the hub cache only and hits the tokenised cache; an error is one line, exit 2."""
    base = bases["tiny-phi-3"]
    args = ["--model", base, "--data", "org/oasst-trees", "--data-filter", "lang=en", "--data-limit", "6", *FAST]
    assert run_main(*args, "--out", tmp_path / "oasst") == 0
    log = capsys.readouterr().out
    assert "--data org/oasst-trees: revision 0123456789ab, split train, 1 file" in log
    assert "--data-filter lang=en, --data-limit 6" in log and "data cache: tokenising" in log
    record = json.loads((tmp_path / "oasst" / "training_config.json").read_text())
    assert record["config"]["data_filter"] == "lang=en" and record["config"]["data_limit"] == 6
    assert record["config"]["data_split"] == "train"
    assert record["data_sources"]["data"]["revision"] == SHA
    assert len(record["data_sources"]["data"]["files"][0]["sha256"]) == 64

    def forbidden(*a, **k):
        raise AssertionError("tokenised on a cache hit")

    monkeypatch.setattr(cache, "_tokenize_chunk", forbidden)
    assert run_main(*args, "--out", tmp_path / "oasst-again") == 0
    assert "data cache: hit" in capsys.readouterr().out
    monkeypatch.undo()  # (the fixture's patches are re-applied below)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)

    assert run_main("--model", base, "--data", "org/qa-csv", *FAST, "--out", tmp_path / "csv") == 0
    log = capsys.readouterr().out
    assert "validation: org/qa-csv (validation): 4/4 examples" in log
    assert run_main("--model", base, "--data", "org/two-configs", "--data-config", "chats", *FAST,
                    "--out", tmp_path / "chats") == 0
    assert "config chats, split train" in capsys.readouterr().out
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        assert run_main("--model", base, "--data", "org/cat-memes", *FAST, "--out", tmp_path / "memes") == 0
        assert "org/cat-memes (train)" in capsys.readouterr().out

    assert run_main("--model", base, "--data", "org/qa-csv", "--data-split", "dev2", *FAST,
                    "--out", tmp_path / "bad") == 2
    err = capsys.readouterr().err
    assert err == "error: --data org/qa-csv: no split 'dev2' (--data-split); it has: train, validation\n"
    assert not (tmp_path / "bad").exists()


def test_online_download_then_offline(hub, tmp_path, monkeypatch):
    """Online: the listing comes from the hub (dataset_info), files from hf_hub_download by branch
    (patched here to serve `fake_hub`'s files into a fresh cache, recording refs/main as the real
    one does); then offline, the same id resolves from that cache alone."""
    import shutil
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import HfApi, constants

    served = hub / "datasets--org--qa-csv" / "snapshots" / SHA
    fresh = tmp_path / "fresh-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fresh))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    siblings = [SimpleNamespace(rfilename=p.relative_to(served).as_posix()) for p in served.rglob("*") if p.is_file()]
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, repo_id, **kw: SimpleNamespace(sha=SHA, siblings=siblings))
    calls = []

    def download(repo_id, filename, *, repo_type, revision, local_files_only=False, **kw):
        calls.append((filename, revision))
        repo = fresh / "datasets--org--qa-csv"
        target = repo / "snapshots" / SHA / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(served / filename, target)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / revision).write_text(SHA)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    online = data_sources("org/qa-csv")
    assert sorted(calls) == [("data/train.csv", "main"), ("data/validation.csv", "main")]
    monkeypatch.undo()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fresh))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    offline = data_sources("org/qa-csv")
    assert offline.describe() == online.describe()
