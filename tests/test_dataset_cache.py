"""The tokenised dataset cache (phicore/data/cache.py).

Issue 8's "must show": a second run does no tokenisation (and says so), and training from the
cache keeps resident memory flat as the row count grows (a CI-sized check here; the 100k / 1M
figures come from bench/cache_memory.py). Also: the cache holds exactly what in-memory
tokenisation gives (oracle: `tokenize_dataset` over `read_conversations`), in file order
across worker processes; a changed data file, tokenizer or setting misses; a failed build
leaves nothing behind.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from train_runs import run_main, write_jsonl  # noqa: E402
from bench.cache_memory import PEAK_RSS_WRAPPER  # noqa: E402
from phicore.data import DataError, prompt_format_for, read_conversations, tokenize_dataset  # noqa: E402
from phicore.data import cache  # noqa: E402
from phicore.data.files import iter_conversations  # noqa: E402
from phicore.tokenizer import load_tokenizer  # noqa: E402

FAST = ["--max-length", "64", "--quiet", "--no-grad-checkpointing"]


def records(n: int) -> list[dict]:
    """Mixed formats are not allowed in one file, so: prompt/response pairs of varied length;
    every 50th has a prompt so long that nothing of the reply survives max_length=64 (dropped),
    every 7th a reply cut short (truncated, kept)."""
    out = []
    for i in range(n):
        prompt = f"What is {i} plus {i % 5}?" + (" Think hard." * 30 if i % 50 == 3 else "")
        response = f"{i + i % 5}, says my cat." + (" Purr." * 12 if i % 7 == 1 else "")
        out.append({"prompt": prompt, "response": response})
    return out


def build(path, tokenizer, fmt, cache_dir, workers=None, max_length=64, train_on_prompt=False):
    return cache.open_or_build(path, tokenizer, fmt, max_length=max_length, train_on_prompt=train_on_prompt,
                               cache_dir=cache_dir, workers=workers, show_progress=False, log=lambda m: None)


# ----------------------------------------------------------------------------- contents

@pytest.mark.parametrize("preset", ["tiny-phi-2", "tiny-phi-3"])
def test_cache_holds_what_in_memory_tokenisation_gives(bases, preset, tmp_path):
    """600 rows = 3 chunks on 2 forked workers: the examples come back in file order, each
    equal to tokenize_dataset's (ids, labels, source line), with the same statistics."""
    data = write_jsonl(tmp_path / "mixed.jsonl", records(600))
    tokenizer = load_tokenizer(bases[preset])
    fmt = prompt_format_for(tokenizer)
    expected, stats = tokenize_dataset(read_conversations(data), fmt, tokenizer, 64)
    assert stats.truncated > stats.dropped_no_target > 0  # both cases are exercised

    examples, hit = build(data, tokenizer, fmt, tmp_path / "cache", workers=2)
    assert not hit and examples.meta["workers"] == 2
    assert examples.stats == stats
    assert len(examples) == len(expected)
    assert examples.lengths.tolist() == [len(e) for e in expected]
    for got, want in zip(examples, expected):
        assert (got.input_ids, got.labels, got.source) == (want.input_ids, want.labels, want.source)
    # a subset (the train/validation split) reads the same examples lazily
    subset = examples.subset(np.array([5, 0, 77]))
    assert [e.input_ids for e in subset] == [expected[i].input_ids for i in (5, 0, 77)]
    assert subset.lengths.tolist() == [len(expected[i]) for i in (5, 0, 77)]
    # mapped, not loaded: the arrays are numpy memmaps of the entry's files
    assert isinstance(examples._arrays["input_ids"], np.memmap)
    assert sorted(p.name for p in examples.folder.iterdir()) == sorted(
        [f for f, _ in cache.FILES.values()] + [cache.META])


@pytest.mark.parametrize("user_setting", [None, "true"])
def test_workers_get_tokenizers_parallelism_off_and_this_process_keeps_its_environment(
        bases, tmp_path, monkeypatch, user_setting):
    """The workers are the parallelism: each is forked with TOKENIZERS_PARALLELISM=false (a value
    the user set is kept), and this process's environment is the same after the build."""
    if user_setting is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", user_setting)
    expected_in_workers = user_setting or "false"
    parent = os.getpid()
    tokenize_conversation = cache.tokenize_conversation

    def in_a_worker(*args, **kwargs):  # the pool is forked, so the workers run this wrapper
        assert os.getpid() != parent, "tokenised in this process, not in a worker"
        assert os.environ.get("TOKENIZERS_PARALLELISM") == expected_in_workers
        return tokenize_conversation(*args, **kwargs)

    monkeypatch.setattr(cache, "tokenize_conversation", in_a_worker)
    data = write_jsonl(tmp_path / "pairs.jsonl", records(300))
    tokenizer = load_tokenizer(bases["tiny-phi-3"])
    examples, _ = build(data, tokenizer, prompt_format_for(tokenizer), tmp_path / "cache", workers=2)
    assert examples.meta["workers"] == 2 and len(examples) > 0
    assert os.environ.get("TOKENIZERS_PARALLELISM") == user_setting


def test_iter_conversations_streams_jsonl_like_read_conversations(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", records(20))
    assert list(iter_conversations(good)) == read_conversations(good)
    as_list = tmp_path / "list.jsonl"  # a JSON list under a .jsonl name: read whole, as before
    as_list.write_text(json.dumps(records(3)), encoding="utf-8")
    assert list(iter_conversations(as_list)) == read_conversations(as_list)
    bad = {
        "json": b'{"prompt": "a", "response": "b"}\n{"prompt": "a",\n',
        "utf8": b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "x"}\n',
        "field": b'{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n',
        "empty": b"\n  \n",
        "type": b'{"prompt": "a", "response": "b"}\n[1, 2]\n',
    }
    for name, content in bad.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(content)
        with pytest.raises(DataError) as streamed:
            list(iter_conversations(path))
        with pytest.raises(DataError) as whole:
            read_conversations(path)
        assert str(streamed.value) == str(whole.value), name


# ----------------------------------------------------------------------------- runs

def test_second_run_does_no_tokenisation(bases, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "pairs.jsonl", records(40))
    args = ["--model", bases["tiny-phi-3"], "--data", data, "--data-cache", tmp_path / "cache", "--max-steps", 2,
            "--batch-size", 4, "--val-split", 0.1, *FAST]
    assert run_main(*args, "--out", tmp_path / "first") == 0
    first = capsys.readouterr().out
    assert "data cache: tokenising 40 rows" in first and "hit" not in first

    def forbidden(*a, **k):
        raise AssertionError("tokenised on a cache hit")

    monkeypatch.setattr(cache, "_tokenize_chunk", forbidden)
    monkeypatch.setattr(cache, "tokenize_conversation", forbidden)
    monkeypatch.setattr(importlib.import_module("phicore.data.tokenization"), "tokenize_segments", forbidden)
    assert run_main(*args, "--out", tmp_path / "second") == 0
    second = capsys.readouterr().out
    assert "data cache: hit" in second and "(no tokenisation)" in second and "tokenising" not in second
    data_line = lambda out: next(line for line in out.splitlines() if line.startswith("data: "))  # noqa: E731
    assert data_line(first) == data_line(second)  # the statistics come from the entry
    a, b = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("first", "second"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same training, bit for bit
    record = json.loads((tmp_path / "second" / "training_config.json").read_text())
    assert Path(record["data_cache"]).parent == tmp_path / "cache"


def test_a_changed_file_tokenizer_or_setting_misses(bases, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", records(30))
    folder = tmp_path / "base"
    shutil.copytree(bases["tiny-phi-3"], folder)
    tokenizer = load_tokenizer(folder)
    fmt = prompt_format_for(tokenizer)
    store = tmp_path / "cache"
    first, hit = build(data, tokenizer, fmt, store)
    assert not hit
    again, hit = build(data, load_tokenizer(folder), prompt_format_for(load_tokenizer(folder)), store)
    assert hit and again.folder == first.folder  # a freshly loaded, identical tokenizer hits

    folders = {first.folder}

    def misses(path=data, tok=tokenizer, form=fmt, **settings):
        examples, hit = build(path, tok, form, store, **settings)
        assert not hit and examples.folder not in folders
        folders.add(examples.folder)
        return examples

    changed = write_jsonl(tmp_path / "pairs.jsonl", records(30)[:-1] + [{"prompt": "new", "response": "row"}])
    assert misses(path=changed)[len(first) - 1].input_ids != first[len(first) - 1].input_ids
    data = write_jsonl(tmp_path / "pairs.jsonl", records(30))  # back to the original bytes: a hit again
    assert build(data, tokenizer, fmt, store)[1]

    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}  # a changed tokenizer file: other ids for "What"
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    lowered = load_tokenizer(folder)
    assert misses(tok=lowered, form=prompt_format_for(lowered))[0].input_ids != first[0].input_ids
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<|end|>", "<|end|><|end|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    doubled = load_tokenizer(folder)
    misses(tok=doubled, form=prompt_format_for(doubled))
    misses(max_length=48)
    misses(train_on_prompt=True)
    misses(form=prompt_format_for(tokenizer, template="instruct"))
    assert not list(store.glob("*.tmp-*"))


def test_a_failed_build_leaves_nothing_and_racing_builders_agree(bases, tmp_path):
    tokenizer = load_tokenizer(bases["tiny-phi-2"])
    fmt = prompt_format_for(tokenizer)
    rows = records(1200)
    text = "".join(json.dumps(r) + "\n" for r in rows[:1100]) + '{"prompt": "no reply"}\n'
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text, encoding="utf-8")
    store = tmp_path / "cache"
    with pytest.raises(DataError, match=r"bad\.jsonl:1101: missing field \"response\""):
        build(bad, tokenizer, fmt, store, workers=2)  # found after workers have tokenised chunks
    assert list(store.iterdir()) == []

    good = write_jsonl(tmp_path / "good.jsonl", rows[:50])
    key = cache.cache_key(good, tokenizer, fmt, max_length=64, train_on_prompt=False)
    folder = cache.entry_dir(store, good, key)
    for _ in range(2):  # the second finds the entry already renamed into place: keeps it
        cache.build_entry(folder, good, key, tokenizer, fmt, max_length=64, train_on_prompt=False,
                          show_progress=False, log=lambda m: None)
    assert [p.name for p in store.iterdir()] == [folder.name]
    assert len(cache.open_entry(folder)) == len(tokenize_dataset(read_conversations(good), fmt, tokenizer, 64)[0])


# ----------------------------------------------------------------------------- memory

# bench/cache_memory.py's wrapper runs train.py and prints its own VmHWM (peak resident set)
# at exit. Not ru_maxrss from wait4: Linux carries ru_maxrss across fork + exec, so a child
# started from this (large) test process would report this process's size whenever larger.


def _peak_rss_mib(args: list, log: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, str(REPO / "train.py"), *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    assert "data cache: hit" in proc.stdout
    return int(proc.stdout.split("peak-rss-kib")[-1].split()[0]) / 1024


@pytest.mark.slow
def test_training_memory_does_not_grow_with_rows(bases, tmp_path):
    """4k and 40k rows, tokenised here into the cache; then a 3-step training run on each in
    a fresh process (a cache hit), measuring that process's own peak resident set (VmHWM).
    Holding the 40k examples as Python lists would cost at
    least 16 bytes a token (two lists of pointers) more than holding 4k; the cache's run may
    grow by a quarter of that at most (it grows by its int32 index arrays, ~12 bytes a row)."""
    tokenizer = load_tokenizer(bases["tiny-phi-2"])
    fmt = prompt_format_for(tokenizer)
    store = tmp_path / "cache"
    peaks, tokens = {}, {}
    for rows in (4_000, 40_000):
        data = write_jsonl(tmp_path / f"rows-{rows}.jsonl", records(rows))
        examples, _ = build(data, tokenizer, fmt, store, max_length=64)
        tokens[rows] = examples.stats.tokens
        peaks[rows] = _peak_rss_mib(["--model", bases["tiny-phi-2"], "--data", data, "--data-cache", store,
                                     "--out", tmp_path / f"out-{rows}", "--max-steps", 3, "--batch-size", 8,
                                     "--val-split", 0, *FAST], tmp_path / f"{rows}.log")
    print([(p.name, [l for l in p.read_text().splitlines() if "peak" in l]) for p in sorted(tmp_path.glob("*.log"))])
    in_memory_growth = 16 * (tokens[40_000] - tokens[4_000]) / 2**20
    growth = peaks[40_000] - peaks[4_000]
    print(f"peak RSS: 4k rows {peaks[4_000]:.1f} MiB, 40k rows {peaks[40_000]:.1f} MiB; "
          f"lists alone would add >= {in_memory_growth:.1f} MiB")
    assert growth < in_memory_growth / 4, (peaks, in_memory_growth)
