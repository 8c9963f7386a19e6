"""The merge's inputs: fetched (s3:// downloaded), verified, and checked to be mergeable.

Inputs must be complete checkpoints (a valid mot-manifest.json); a user's own model folders without
one are merged only with --allow-unmanifested-inputs, and then the sha256 of every file used from them
is recorded in the output's manifest. Inputs (and the base) must agree on tie_word_embeddings.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mot_trainer import storage
from mot_trainer.errors import InvalidInput
from mot_trainer.manifest import MANIFEST_NAME, sha256_file, stamped_sha256, verify_file, verify_folder

log = logging.getLogger(__name__)

ALLOW_UNMANIFESTED = "--allow-unmanifested-inputs"
TIED_HEAD = "lm_head.weight"
TIE_KEY = "tie_word_embeddings"


def fetch_inputs(uris, work: Path, hashing: ThreadPoolExecutor,
                 allow_unmanifested: bool = False) -> tuple[list[Path], list[Future], list[int]]:
    """Local folders: sizes checked now, sha256 verified on a background thread while the merge reads
    (the output's manifest waits for it). s3:// inputs: downloaded and fully verified first.

    An input without a manifest is refused unless `allow_unmanifested`; then it is used as it is (an
    s3:// one: everything under its prefix is downloaded). Returns the local folders, the pending
    verifications and the indexes of the inputs without a manifest."""
    folders, pending, unmanifested = [], [], []
    for i, uri in enumerate(uris):
        if storage.is_s3(uri):
            has_manifest = storage.read_checkpoint_manifest(uri) is not None
        else:
            if not Path(uri).is_dir():
                raise InvalidInput(f"--inputs {uri}: no such folder")
            has_manifest = (Path(uri) / MANIFEST_NAME).exists()
        if not has_manifest:
            if not allow_unmanifested:
                raise InvalidInput(f"--inputs {uri}: no {MANIFEST_NAME}; the checkpoint is incomplete (to merge "
                                   f"a model folder of your own that has none, pass {ALLOW_UNMANIFESTED})")
            log.warning("--inputs %s has no %s; using it unverified (%s)", uri, MANIFEST_NAME, ALLOW_UNMANIFESTED)
            unmanifested.append(i)
        if storage.is_s3(uri):
            folders.append(storage.download_dir(uri, work / f"input-{i}", verify=has_manifest))
            continue
        folder = Path(uri)
        if has_manifest:
            manifest = verify_folder(folder, check_hashes=False)
            pending += [hashing.submit(verify_file, folder / e["path"], e["sha256"]) for e in manifest["files"]]
        folders.append(folder)
    return folders, pending, unmanifested


def hash_entry(folder: Path, rel: str) -> dict:
    """{"path", "size", "sha256"} of a file of an input without a manifest, as a manifest lists it."""
    path = folder / rel
    return {"path": rel, "size": path.stat().st_size, "sha256": stamped_sha256(path) or sha256_file(path)}


def fetch_base(uri: str, work: Path) -> Path:
    """The base may be a user's model without a manifest; one that has a manifest must match it."""
    verify = storage.read_checkpoint_manifest(uri) is not None
    if not verify:
        log.warning("--base %s has no %s; using it unverified", uri, MANIFEST_NAME)
    return storage.download_dir(uri, work / "base", verify=verify)


def check_compatible(checkpoints, base) -> list:
    """The output's tensors (the first input's, in its file order); InvalidInput naming the input and
    tensor when names, shapes or dtypes differ."""
    first = checkpoints[0]
    names = set(first.tensors)
    others = checkpoints[1:] + ([base] if base else [])
    _check_tie_settings([first, *others])
    holders = [TIED_HEAD in c.tensors for c in [first, *others]]
    if any(holders) and not all(holders) and _effective_tie(_tie_setting(first.config())):
        # Tied embeddings: some writers save the shared head, others drop it. It is redundant.
        log.info("tie_word_embeddings: dropping %s (present in only some inputs)", TIED_HEAD)
        names.discard(TIED_HEAD)
    for other in others:
        other_names = set(other.tensors) - ({TIED_HEAD} if TIED_HEAD not in names else set())
        missing, extra = sorted(names - other_names), sorted(other_names - names)
        if missing:
            raise InvalidInput(f"{other.label}: lacks tensor {missing[0]!r} that {first.label} has")
        if extra and other is not base:
            raise InvalidInput(f"{other.label}: has tensor {extra[0]!r} that {first.label} lacks")
        for name in sorted(names):
            a, b = first.tensors[name], other.tensors[name]
            if a.shape != b.shape:
                raise InvalidInput(f"{other.label}: tensor {name!r} has shape {list(b.shape)}, "
                                   f"{first.label} has {list(a.shape)}")
            if a.dtype != b.dtype:
                raise InvalidInput(f"{other.label}: tensor {name!r} has dtype {b.dtype}, {first.label} has {a.dtype}")
    return [info for name, info in first.tensors.items() if name in names]


def _check_tie_settings(checkpoints) -> None:
    """InvalidInput naming two checkpoints whose effective tie_word_embeddings differ: a tied model
    has no head of its own, so merging it with untied ones would silently drop theirs."""
    settings = [_tie_setting(c.config()) for c in checkpoints]
    if len(set(settings)) == 1:
        return  # the same setting (or the same model type's default): no need to ask transformers
    values = [_effective_tie(s) for s in settings]
    for ckpt, value in zip(checkpoints[1:], values[1:], strict=True):
        if value != values[0]:
            raise InvalidInput(
                f"{TIE_KEY} differs: {ckpt.label} has {str(value).lower()}, {checkpoints[0].label} has "
                f"{str(values[0]).lower()}; merge only models with the same {TIE_KEY}")


def _tie_setting(config: dict) -> tuple:
    """("set", value) from the config (or its text_config, as pre-v5 composite models save it), else
    ("default", model_type): the config class's default applies."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict) and TIE_KEY in cfg:
            return ("set", bool(cfg[TIE_KEY]))
    model_type = config.get("model_type")
    return ("default", model_type if isinstance(model_type, str) else None)


def _effective_tie(setting: tuple) -> bool:
    kind, value = setting
    return value if kind == "set" else _default_tie(value)


@functools.cache
def _default_tie(model_type) -> bool:
    """transformers' tie_word_embeddings for a config that does not set it: its config class's default
    (True for gpt2, False for qwen2 ...); False, as transformers assumes, for an unknown model type."""
    if isinstance(model_type, str) and model_type:
        try:  # transformers only when a setting must be looked up: a merge need not import it
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            default = getattr(CONFIG_MAPPING[model_type], TIE_KEY, None)
        except (ImportError, KeyError):
            default = None
        if isinstance(default, bool):
            return default
    return False
