"""Digests of every file of a checkpoint (`manifest.json`), written at save, verified at load.

Neither torch.distributed.checkpoint nor megatron-core records checksums: a flipped bit in a
shard loads without a word, a truncated one ends the load in an EOFError. The manifest holds
the size and digest (xxh3-128 where the xxhash package is installed, else SHA-256) of each file
under the step directory, keyed by its path relative to it.

Who hashes what: each file belongs to the rank that wrote it (`__<rank>_<n>.distcp`,
`rng/rank_<rank>.json`; the rest to rank 0). At save every rank hashes the files it has just
written (still in its node's page cache) once the save is complete and before rank 0 renames
the directory into place; the digests are gathered to rank 0, which writes the manifest. At
load the same partition (rank mod the current world size) hashes each file exactly once, in
parallel, and the verdicts are exchanged, so every rank takes the same decision (fall back,
or stop naming the file) without any rank reading the whole checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Optional

import torch.distributed as dist

from megatron_prolong.atomic_file import write_bytes_synced

MANIFEST = "manifest.json"
_CHUNK = 8 << 20
_OWNER = re.compile(r"^(?:__|rank_)(\d+)[_.]")


def _new_hash(algorithm: str):
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algorithm!r}")


def default_algorithm() -> str:
    try:
        import xxhash  # noqa: F401  (about 10x faster than SHA-256; accidental damage is the threat)
    except ImportError:
        return "sha256"
    return "xxh3_128"


def digest_file(path: str, algorithm: str) -> tuple[int, str]:
    h, size = _new_hash(algorithm), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def owner(relpath: str, world_size: int) -> int:
    m = _OWNER.match(os.path.basename(relpath))
    return int(m.group(1)) % world_size if m else 0


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj) -> list:
    """Results of all ranks (in-memory exchange between this job's own processes)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _files_under(root: str) -> list[str]:
    out = []
    for folder, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root)
            if rel != MANIFEST:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def digest_own_files(root: str) -> dict:
    """{relative path: (size, digest)} of the files under `root` that this rank owns; call
    once every rank's files are complete (all ranks then see the same listing)."""
    rank, world = _rank_world()
    algorithm = default_algorithm()
    return {rel: digest_file(os.path.join(root, rel), algorithm)
            for rel in _files_under(root) if owner(rel, world) == rank}


def write_manifest(root: str, parts: list[dict]) -> None:
    """root/manifest.json from every rank's digest_own_files (one process writes it)."""
    entries: dict = {}
    for part in parts:
        entries.update(part)
    body = {"format": 1, "algorithm": default_algorithm(),
            "files": {rel: {"size": size, "digest": digest}
                      for rel, (size, digest) in sorted(entries.items())}}
    write_bytes_synced(os.path.join(root, MANIFEST), json.dumps(body, indent=1).encode())


class ManifestError(ValueError):
    """manifest.json itself is unreadable or malformed."""


def read_manifest(root: str) -> Optional[dict]:
    """{relative path: (size, digest)} and the algorithm; None when there is no manifest
    (a checkpoint from before manifests)."""
    path = os.path.join(root, MANIFEST)
    if not os.path.lexists(path):
        return None
    try:
        with open(path) as f:
            body = json.load(f)
        algorithm = body["algorithm"]
        _new_hash(algorithm)
        files = {}
        for rel, entry in body["files"].items():
            parts = rel.split("/")
            if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"path {rel!r} leaves the checkpoint directory")
            size, digest = entry["size"], entry["digest"]
            if not isinstance(size, int) or size < 0 or not isinstance(digest, str):
                raise ValueError(f"entry {rel!r} is malformed")
            files[rel] = (size, digest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc})") from None
    return {"algorithm": algorithm, "files": files}


def _check_file(root: str, rel: str, size: int, digest: Optional[str], algorithm: str
                ) -> Optional[str]:
    path = os.path.join(root, *rel.split("/"))
    try:
        if os.path.islink(path) or not os.path.isfile(path):
            return f"{path} is missing (or not a regular file)"
        actual = os.path.getsize(path)
        if actual != size:
            return f"{path} has {actual} bytes, the manifest records {size} (truncated or replaced)"
        if digest is not None and digest_file(path, algorithm)[1] != digest:
            return f"{path} does not match its digest in {MANIFEST} (the file is damaged)"
    except OSError as exc:
        return f"{path}: unreadable ({exc.strerror})"
    return None


def quick_check(root: str) -> Optional[str]:
    """Local and cheap (stat only): the first file whose size differs from the manifest, or
    None. Used to pick a checkpoint before the (collective) digest check."""
    try:
        manifest = read_manifest(root)
    except ManifestError as exc:
        return str(exc)
    if manifest is None:
        return None
    for rel, (size, _) in manifest["files"].items():
        problem = _check_file(root, rel, size, None, manifest["algorithm"])
        if problem:
            return problem
    return None


def verify(root: str) -> tuple[bool, list[str]]:
    """Collective (every rank calls it, in the same order). (has a manifest, problems): each
    file's size and digest checked by one rank; every rank returns the same problems."""
    rank, world = _rank_world()
    try:
        manifest = read_manifest(root)
        problems = []
    except ManifestError as exc:
        manifest, problems = None, [str(exc)]
    if manifest is not None:
        for rel, (size, digest) in manifest["files"].items():
            if owner(rel, world) == rank:
                problem = _check_file(root, rel, size, digest, manifest["algorithm"])
                if problem:
                    problems.append(problem)
    gathered = all_gather((manifest is not None, problems))
    merged = sorted({p for _, part in gathered for p in part})
    return all(has for has, _ in gathered), merged
