"""Sharded preprocessing: which inputs a shard owns, where it writes, and when it is complete.

Two rules, chosen so that merging the shards in order gives, byte for byte, what one process
over the same inputs writes:

* without grouping, a shard owns a contiguous range of input files (balanced by bytes); the
  merge concatenates the shards in index order. An input file is the unit of work.
* with ``--group-key``, a group may span input files (The Stack: one repository's files sit in
  several per-language files), so a shard owns the groups whose key hashes to it (BLAKE2b, stable
  across processes and machines). Every shard reads and parses every input but tokenizes only its
  own groups; each kept document remembers the input position of its group's first record, and
  the merge interleaves the shards by it, restoring the single-process order (groups in order of
  first appearance). Lines that name no group (malformed, field missing) belong to shard 0.

Completion: outputs are written under temporary names and renamed into place; a marker
``PREFIX.done`` (JSON with the job's fingerprint: options, inputs with sizes and mtimes) is
written last; a rerun removes it just before renaming its own outputs into place, so the
previous complete output stays whole until the new one is complete (``retire``). A rerun with
the same fingerprint skips a complete output; a missing marker means the output is redone from
scratch (leftovers of a killed run removed).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Optional

from ..atomic_file import write_text_atomically

DONE_SUFFIX = ".done"
ORDER_SUFFIX = ".order.npy"  # grouped shards: first input position of each kept document
_TMP_RE = re.compile(r"\.tmp-\d+(\.|$)")


class ShardSpec:
    """Shard ``index`` of ``count`` (``--shard I/N``, 0-based)."""

    def __init__(self, index: int, count: int) -> None:
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"--shard {index}/{count}: need 0 <= I < N (I is 0-based, as "
                             "SLURM_ARRAY_TASK_ID with --array=0-(N-1))")
        self.index, self.count = index, count

    @classmethod
    def parse(cls, text: str) -> "ShardSpec":
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"--shard {text!r}: expected I/N, e.g. 3/16 (0-based index)")
        return cls(int(m.group(1)), int(m.group(2)))

    def __repr__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_prefix(prefix: str, index: int, count: int) -> str:
    return f"{prefix}.shard-{index:05d}-of-{count:05d}"


def find_shards(prefix: str, count: Optional[int] = None) -> list[str]:
    """The N shard prefixes of ``prefix`` in index order; an error names the missing ones."""
    if count is None:
        counts = {int(m.group(1)) for p in glob.glob(glob.escape(prefix) + ".shard-*-of-*.idx")
                  if (m := re.search(r"-of-(\d+)\.idx$", p))}
        if len(counts) != 1:
            raise FileNotFoundError(
                f"no shard outputs of {prefix!r} found" if not counts else
                f"shard outputs of {prefix!r} from runs with different shard counts "
                f"{sorted(counts)}; pass --num-shards")
        count = counts.pop()
    return [shard_prefix(prefix, i, count) for i in range(count)]


def files_for_shard(files: list[str], spec: ShardSpec) -> list[str]:
    """Contiguous range of files whose cumulative bytes fall in this shard's share."""
    sizes = [max(os.path.getsize(f), 1) for f in files]
    total, out, acc = sum(sizes), [], 0
    for f, size in zip(files, sizes):
        # a file belongs to the shard that holds the middle of its bytes
        if int((acc + size / 2) * spec.count // total) == spec.index:
            out.append(f)
        acc += size
    return out


def group_shard(group_key: str, count: int) -> int:
    digest = hashlib.blake2b(group_key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def fingerprint(options: dict, files: list[str]) -> str:
    """What a complete output was made from: options and each input's path, size and mtime."""
    stat = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    text = json.dumps({"options": options, "inputs": stat}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def output_files(prefix: str) -> list[str]:
    """Every file a finished output consists of (existing ones)."""
    names = [prefix + s for s in (".bin", ".idx", ".lossmask.bin", ".lossmask.idx",
                                  ".stats.json", ORDER_SUFFIX)]
    return [n for n in names if os.path.exists(n)]


def read_marker(prefix: str) -> Optional[dict]:
    try:
        with open(prefix + DONE_SUFFIX) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_complete(prefix: str, job_fingerprint: Optional[str] = None) -> bool:
    """True when the marker exists, matches the fingerprint (when given) and every file it
    lists still has the size it had when the output was published."""
    marker = read_marker(prefix)
    if marker is None or (job_fingerprint and marker.get("fingerprint") != job_fingerprint):
        return False
    return all(os.path.exists(p) and os.path.getsize(p) == n
               for p, n in marker.get("files", {}).items())


def write_marker(prefix: str, job_fingerprint: str, extra: Optional[dict] = None) -> None:
    marker = {"fingerprint": job_fingerprint,
              "files": {p: os.path.getsize(p) for p in output_files(prefix)}, **(extra or {})}
    write_text_atomically(prefix + DONE_SUFFIX, json.dumps(marker, indent=2),
                          tmp=prefix + f".tmp-{os.getpid()}{DONE_SUFFIX}")


def start_over(prefix: str) -> None:
    """Before (re)writing ``prefix``: drop the marker first, then old outputs and the
    temporaries a killed run left behind. One writer per output prefix is assumed."""
    if os.path.exists(prefix + DONE_SUFFIX):
        os.remove(prefix + DONE_SUFFIX)
    for path in output_files(prefix):
        os.remove(path)
    remove_temporaries(prefix)


def remove_temporaries(prefix: str, pid: Optional[int] = None) -> None:
    """Delete ``prefix``'s temporaries: those of any process (left by a killed run; the caller
    owns the prefix's lock), or only those of process `pid` (its own, after a failure)."""
    pattern = glob.escape(prefix) + (f".tmp-{pid}" if pid is not None else ".tmp-") + "*"
    for path in glob.glob(pattern):
        if _TMP_RE.match(path[len(prefix):]):
            os.remove(path)


def retire(prefix: str, replaced: list[str]) -> None:
    """Just before a new output is renamed over ``prefix``: drop the old marker first, then the
    old files the new output does not replace (a stale .lossmask pair, ordering file). Until
    this moment the previous complete output stays whole, so a rerun that fails keeps it."""
    if os.path.exists(prefix + DONE_SUFFIX):
        os.remove(prefix + DONE_SUFFIX)
    for path in output_files(prefix):
        if path not in replaced:
            os.remove(path)
