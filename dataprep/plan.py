"""Turn the ``data`` config into an ordered list of tasks (one per input file).

Canonical order (which decides which copy of a duplicate is kept, and the order of shards, provenance
and rejects): splits ``train`` then ``val`` (then any other split, sorted), domains in config order,
files in the order listed (folders and globs expanded sorted). Worker scheduling never changes it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from dataprep.readers import InputError, Source, expand_entry
from dataprep.safety import check_name

SPLIT_ORDER = ("train", "val")


@dataclass(frozen=True)
class Task:
    index: int      # position in canonical order
    domain: str
    split: str
    file_no: int    # position within its (domain, split) group
    source: Source
    key: str        # config key it came from, for error messages
    content: str = "text"   # what the domain holds (`kind:` in the data config): text | code | math

    def doc_id(self, line: int) -> str:
        """Stable document id: ``domain/split/file_no/basename:line`` (``line`` = row for tabular inputs)."""
        name = os.path.basename(self.source.path.rstrip("/")) or self.source.path
        return f"{self.domain}/{self.split}/{self.file_no:04d}/{name}:{line}"

    @property
    def group(self) -> tuple[str, str]:
        return (self.domain, self.split)


def _split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split), "") if split in SPLIT_ORDER else (len(SPLIT_ORDER), split)


KINDS = ("text", "code", "math")


def domain_kind(domain: str, entry: dict) -> str:
    """A domain's declared content (`kind: text | code | math`, default text): steps scoped with
    `kinds: [...]` (the default chain's prose heuristics: `kinds: [text]`) touch only those domains."""
    kind = entry.get("kind", "text")
    if kind not in KINDS:
        raise InputError(f"data.domains.{domain}.kind: {kind!r} is not one of {', '.join(KINDS)}")
    return kind


def build_plan(data_cfg: dict) -> list[Task]:
    """Expand ``data.domains`` into tasks; raises ``InputError`` naming the config key on problems."""
    if data_cfg.get("manifest"):
        raise InputError("data.manifest is set: this data config already points at prepared data; "
                         "prep needs raw inputs under data.domains")
    domains = data_cfg.get("domains")
    if not isinstance(domains, dict) or not domains:
        raise InputError("data.domains: expected a mapping {domain: {train: PATH(S), val: PATH(S)}}")
    entries: dict[tuple[str, str], list[tuple[str, str]]] = {}
    contents = {}
    for domain, splits in domains.items():     # names first: they become folder names under shards/
        check_name(domain, f"data.domains.{domain}", InputError)
        for split in splits if isinstance(splits, dict) else ():
            if split != "kind":
                check_name(split, f"data.domains.{domain}.{split}", InputError)
    for domain, splits in domains.items():
        if not isinstance(splits, dict) or not splits:
            raise InputError(f"data.domains.{domain}: expected a mapping {{train: PATH(S), val: PATH(S)}}")
        contents[domain] = domain_kind(domain, splits)
        for split, paths in splits.items():
            if split == "kind":
                continue
            key = f"data.domains.{domain}.{split}"
            if paths is None:
                raise InputError(f"{key}: no path given")
            if isinstance(paths, (str, os.PathLike)):
                paths = [paths]
            elif not isinstance(paths, (list, tuple)):
                raise InputError(f"{key}: expected a path or a list of paths, got {type(paths).__name__}")
            for j, p in enumerate(paths):
                if not isinstance(p, (str, os.PathLike)):
                    raise InputError(f"{key}[{j}]: expected a path string, got {p!r}")
                entries.setdefault((domain, split), []).append((str(p), key if len(paths) == 1 else f"{key}[{j}]"))
    order = sorted(entries, key=lambda g: (_split_rank(g[1]), list(domains).index(g[0])))
    tasks: list[Task] = []
    for domain, split in order:
        file_no = 0
        for path, key in entries[(domain, split)]:
            for src in expand_entry(path, key):
                tasks.append(Task(len(tasks), domain, split, file_no, src, key, contents[domain]))
                file_no += 1
    return tasks
