"""`mot-manifest.json`: the completeness marker of a checkpoint folder.

A producer writes every file first and the manifest last; it lists each file's size and sha256 plus
the producer's inputs, parameters and metrics. A folder without a valid manifest is incomplete:
nothing reads it, and a retry may overwrite it. Importable without torch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

from mot_trainer.errors import InvalidInput

MANIFEST_NAME = "mot-manifest.json"
FORMAT = "mot-manifest/v1"
KINDS = ("sft", "merge")
_CHUNK = 8 << 20
# Transient files a writer may leave behind; never part of a checkpoint.
_TEMP_SUFFIXES = (".partial", ".tmp")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed in 8 MiB chunks (memory stays flat for multi-GB shards)."""
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def checkpoint_files(folder: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of every file in the folder, the manifest and temp files excluded."""
    root = Path(folder)
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST_NAME and not rel.endswith(_TEMP_SUFFIXES):
            files.append(rel)
    return files


def write_manifest(folder, *, kind: str, inputs: dict, params: dict, metrics: dict) -> dict:
    """Hash every file in `folder` and write the manifest last, atomically. Returns the manifest."""
    if kind not in KINDS:
        raise ValueError(f"manifest kind must be one of {KINDS}, not {kind!r}")
    root = Path(folder)
    files = [
        {"path": rel, "size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
        for rel in checkpoint_files(root)
    ]
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "files": files,
        "inputs": inputs,
        "params": params,
        "metrics": metrics,
    }
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST_NAME)  # readers never see a half-written manifest
    return manifest


def parse_manifest(data: bytes | str, source: str) -> dict:
    """Parse and check the manifest's structure; `source` names it in errors."""
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InvalidInput(f"{source}: not a {FORMAT} manifest")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise InvalidInput(f"{source}: field 'files' must be a list")
    for i, entry in enumerate(files):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            raise InvalidInput(f"{source}: files[{i}] needs 'path' (str), 'size' (int) and 'sha256' (str)")
        if _unsafe(entry["path"]):
            raise InvalidInput(f"{source}: files[{i}].path {entry['path']!r} leaves the folder")
    return manifest


def _unsafe(rel: str) -> bool:
    parts = Path(rel).parts
    return not rel or Path(rel).is_absolute() or ".." in parts or rel == MANIFEST_NAME


def load_manifest(folder) -> dict:
    """The folder's manifest, structure checked; InvalidInput when it is missing or malformed."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"{folder}: no {MANIFEST_NAME}; the checkpoint is incomplete") from None
    return parse_manifest(data, str(path))


def verify_folder(folder, *, check_hashes: bool = True) -> dict:
    """Check every listed file exists with the listed size and sha256; return the manifest.

    Raises InvalidInput naming the first bad file. `check_hashes=False` checks sizes only (cheap),
    for callers that verify hashes while they read.
    """
    manifest = load_manifest(folder)
    root = Path(folder)
    for entry in manifest["files"]:
        path = root / entry["path"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise InvalidInput(f"{path}: listed in {MANIFEST_NAME} but missing") from None
        if size != entry["size"]:
            raise InvalidInput(f"{path}: size {size} bytes, {MANIFEST_NAME} says {entry['size']}")
    if check_hashes:
        for entry in manifest["files"]:
            verify_file(root / entry["path"], entry["sha256"])
    return manifest


def verify_file(path, expected_sha256: str) -> None:
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise InvalidInput(f"{path}: sha256 {actual} does not match {MANIFEST_NAME} ({expected_sha256})")


def read_checkpoint_manifest(uri: str) -> dict | None:
    """The manifest at a local or s3:// checkpoint URI (structure checked), or None when there is none
    yet. Does not hash the files: use storage.download_dir / verify_folder before using them."""
    from mot_trainer import storage  # storage imports this module

    location = storage.join(uri, MANIFEST_NAME)
    try:
        data = storage.read_bytes(location)
    except FileNotFoundError:
        return None
    return parse_manifest(data, location)
