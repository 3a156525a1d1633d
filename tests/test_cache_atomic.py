"""Cache files that ranks read are written whole (a temporary name of the writer's own, fsync, rename)
and the sample index is read only after its completion marker: ranks that build it together, in
threads of one process or in processes, never read a part of it."""
import os
import threading

import numpy as np
import pytest

from dataflex.shards import _sample_counts, build_or_load_index
from dataflex.utils.files import atomic_write


class FakeShard:
    """What build_or_load_index reads of an IndexedDataset: len and sequence_lengths."""

    def __init__(self, lengths):
        self.sequence_lengths = np.asarray(lengths, dtype=np.int32)

    def __len__(self):
        return len(self.sequence_lengths)


def shards(seed: int, n: int = 3, docs: int = 50_000):
    rng = np.random.default_rng(seed)
    return [FakeShard(rng.integers(1, 400, docs)) for _ in range(n)]


def expected(datasets, seq_len):
    docs = np.cumsum([0] + [len(d) for d in datasets])
    counts = np.concatenate([_sample_counts(d.sequence_lengths, seq_len) for d in datasets])
    return docs, np.concatenate([[0], np.cumsum(counts)])


def check(got, want):
    assert all(np.array_equal(np.asarray(g), w) for g, w in zip(got, want))


def test_index_is_read_only_after_its_marker(tmp_path):
    data = shards(0, docs=1000)
    want = expected(data, 32)
    check(build_or_load_index(data, 32, str(tmp_path), "k"), want)
    assert sorted(os.listdir(tmp_path)) == ["k.doc_shard.npy", "k.done.json", "k.sample_start.npy"]   # no temporaries
    # arrays without a marker (a writer that died before it): never read, the index is rebuilt
    os.remove(tmp_path / "k.done.json")
    for name in ("doc_shard", "sample_start"):
        np.save(tmp_path / f"k.{name}.npy", np.zeros(7, dtype=np.int64))
    check(build_or_load_index(data, 32, str(tmp_path), "k"), want)
    # a marker whose arrays were cut short (a damaged disk): rebuilt, not returned
    with open(tmp_path / "k.sample_start.npy", "r+b") as f:
        f.truncate(200)
    check(build_or_load_index(data, 32, str(tmp_path), "k"), want)
    loaded = build_or_load_index(data, 32, str(tmp_path), "k")
    assert all(isinstance(a, np.memmap) for a in loaded)                 # a later launch maps the saved index
    check(loaded, want)


def test_ranks_building_together_never_read_a_part(tmp_path):
    """Eight builders of one index at once (threads of one process share a pid: the temporary names
    of the old code collided), five indexes in a row: every builder gets the whole index."""
    for key in range(5):
        data = shards(key)
        want = expected(data, 16)
        barrier, results, errors = threading.Barrier(8), [], []

        def rank():
            try:
                barrier.wait()
                results.append(build_or_load_index(data, 16, str(tmp_path), f"k{key}"))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=rank) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(results) == 8
        for r in results:
            check(r, want)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = str(tmp_path / "f.json")
    atomic_write(path, lambda f: f.write("old"))

    def dies(f):
        f.write("half")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError):
        atomic_write(path, dies)
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["f.json"]


# ------------------------------------------------- a failed cache build leaves no .tmp debris (issue 20)

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "default",
                         "tokenizer.json")


def two_domains(tmp_path):
    for name in ("a", "b"):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(300):
                f.write('{"text": "document %d of domain %s, a few words long."}\n' % (i, name))
    return {"tokenizer": TOKENIZER, "cache": str(tmp_path / "cache"),
            "domains": {n: {"train": str(tmp_path / f"{n}.jsonl")} for n in ("a", "b")}}


@pytest.mark.parametrize("failure", ["disk full", "error"])
def test_a_failed_cache_build_leaves_no_tmp_files(tmp_path, monkeypatch, failure):
    """Domain b's build fails after 100 documents, its shard and provenance open under `.tmp` names: a full
    disk (ENOSPC from a write to an open file, which names no path) or any other error. No `.tmp` file is
    left in the cache; the disk-full message names the disk and the group's folder; domain a's finished group
    is kept and the next launch completes the cache."""
    import errno

    import dataprep.writer
    from dataflex.data.domains import load_domains
    from dataflex.utils.errors import DataConfigError

    data = two_domains(tmp_path)
    real_add, seen = dataprep.writer.ShardWriter.add, {}

    def add(self, tokens):
        n = seen[self.name] = seen.get(self.name, 0) + 1
        if self.name.startswith("b_") and n > 100:
            assert [p for p in (tmp_path / "cache").rglob("*.tmp")]        # the files a failure could leave
            if failure == "disk full":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("the tokenizer broke")
        return real_add(self, tokens)

    monkeypatch.setattr(dataprep.writer.ShardWriter, "add", add)
    with pytest.raises(DataConfigError if failure == "disk full" else RuntimeError) as e:
        load_domains(data, 32, progress=False)
    assert not [str(p) for p in (tmp_path / "cache").rglob("*.tmp")]
    key = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(key) == 1 and (key[0] / "a" / "train" / ".done.json").is_file() and not (key[0] / "b").exists()
    if failure == "disk full":
        assert str(e.value).startswith(f"disk full: no space left to write {key[0] / 'b' / 'train'} "
                                       "(the disk mounted at /"), str(e.value)
        assert "while building the data cache" in str(e.value)
    monkeypatch.setattr(dataprep.writer.ShardWriter, "add", real_add)
    built = load_domains(data, 32, progress=False)
    assert {n: len(s) for n, s in built.train.items()} == {"a": 300, "b": 300}


def test_a_cache_build_says_what_it_does_at_once(tmp_path, capfd):
    """The first launch tokenizes its inputs into the cache: one progress line naming the folder appears as
    the build starts (stderr), none when the cache is reused."""
    from dataflex.data.domains import load_domains

    data = two_domains(tmp_path)
    load_domains(data, 32, progress=True)
    err = capfd.readouterr().err
    assert f"dataflex: tokenizing 2 input group(s) once into {tmp_path / 'cache'}" in err
    load_domains(data, 32, progress=True)
    assert "tokenizing" not in capfd.readouterr().err
