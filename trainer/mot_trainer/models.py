"""The model a command starts from (sft's --init, eval's --model): a local folder, s3:// or a hub id.

Importable without torch.
"""

from __future__ import annotations

from pathlib import Path

from mot_trainer import storage
from mot_trainer.errors import InvalidInput
from mot_trainer.manifest import MANIFEST_NAME, verify_folder


def fetch_model(uri: str, workdir: Path) -> tuple[str, dict | None]:
    """A local folder (or hub id) for `uri`, plus its manifest when it has one (verified).

    A checkpoint of ours must carry a valid manifest; a user's model folder without one is accepted
    as it is. Each process downloads its own copy of an s3:// model (simple; a shared per-node copy
    would save bandwidth on multi-GPU nodes).
    """
    if storage.is_s3(uri):
        manifest = storage.read_checkpoint_manifest(uri)
        local = storage.download_dir(uri, workdir / "init", verify=manifest is not None)
        return str(local), manifest
    path = Path(uri).expanduser()
    if path.is_dir():
        manifest = verify_folder(path) if (path / MANIFEST_NAME).exists() else None
        return str(path), manifest
    if uri.startswith(("/", ".", "~")) or path.exists():
        raise InvalidInput(f"--init {uri}: no such model folder")
    return uri, None  # a hub id; transformers fetches it where a hub is reachable
