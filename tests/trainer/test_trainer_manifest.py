"""mot-manifest.json: written last, lists every file, verification names the bad file."""

import json

import pytest

from mot_trainer.errors import InvalidInput
from mot_trainer.manifest import (
    FORMAT,
    MANIFEST_NAME,
    sha256_file,
    verify_folder,
    write_manifest,
)
from mot_trainer.storage import read_checkpoint_manifest


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 1000)
    return tmp_path


def test_manifest_lists_every_file_with_size_and_sha256(folder):
    import hashlib

    manifest = write_manifest(folder, kind="sft", inputs={"data": "d.jsonl"}, params={"lr": 1e-5},
                              metrics={"final_loss": 1.5})
    on_disk = json.loads((folder / MANIFEST_NAME).read_text())
    assert on_disk == manifest
    assert manifest["format"] == FORMAT and manifest["kind"] == "sft"
    assert manifest["inputs"] == {"data": "d.jsonl"} and manifest["metrics"] == {"final_loss": 1.5}
    by_path = {f["path"]: f for f in manifest["files"]}
    assert set(by_path) == {"config.json", "sub/weights.bin"}
    blob = (folder / "sub" / "weights.bin").read_bytes()
    assert by_path["sub/weights.bin"] == {
        "path": "sub/weights.bin", "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    assert sha256_file(folder / "config.json") == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert verify_folder(folder) == manifest


def test_missing_manifest_means_incomplete(folder):
    with pytest.raises(InvalidInput, match="incomplete"):
        verify_folder(folder)
    assert read_checkpoint_manifest(str(folder)) is None


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda f: (f / "sub" / "weights.bin").unlink(), "weights.bin: listed .* but missing"),
        (lambda f: (f / "config.json").write_text('{"a": 12}'), "config.json: size 9 bytes"),
        (lambda f: (f / "config.json").write_text('{"a": 2}'), "config.json: sha256 .* does not match"),
    ],
)
def test_verify_names_the_bad_file(folder, tamper, message):
    write_manifest(folder, kind="merge", inputs={}, params={}, metrics={})
    tamper(folder)
    with pytest.raises(InvalidInput, match=message):
        verify_folder(folder)


def test_malformed_manifest_is_invalid_input(folder):
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        verify_folder(folder)
    (folder / MANIFEST_NAME).write_text(json.dumps({"format": FORMAT, "files": [{"path": "../x", "size": 1,
                                                                                "sha256": "0"}]}))
    with pytest.raises(InvalidInput, match="leaves the folder"):
        read_checkpoint_manifest(str(folder))


def test_read_checkpoint_manifest_local(folder):
    written = write_manifest(folder, kind="sft", inputs={}, params={}, metrics={"final_loss": 0.5})
    assert read_checkpoint_manifest(str(folder)) == written


def _stamps_supported(path) -> bool:
    import os

    try:
        os.setxattr(path, "user.mot.probe", b"1")
        os.removexattr(path, "user.mot.probe")
        return True
    except OSError:
        return False


def test_unchanged_files_are_not_hashed_twice(folder, monkeypatch):
    import mot_trainer.manifest as manifest_module

    if not _stamps_supported(folder / "config.json"):
        pytest.skip("no user xattrs on this filesystem: every check hashes, which is correct but slow")
    write_manifest(folder, kind="sft", inputs={}, params={}, metrics={})

    def no_reading(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(manifest_module, "sha256_file", no_reading)
    verify_folder(folder)  # every file answered from its stamp


def test_a_rewrite_of_a_stamped_file_is_caught(folder):
    """Same size, new bytes, written right after the manifest: the stamp no longer matches (new mtime)."""
    write_manifest(folder, kind="sft", inputs={}, params={}, metrics={})
    blob = bytearray((folder / "sub" / "weights.bin").read_bytes())
    blob[10] ^= 0xFF
    (folder / "sub" / "weights.bin").write_bytes(bytes(blob))
    with pytest.raises(InvalidInput, match="weights.bin: sha256 .* does not match"):
        verify_folder(folder)


def test_a_file_written_moments_ago_gets_no_stamp(tmp_path):
    """Within the timestamp tick a second write could keep the mtime: such a hash is not recorded."""
    from mot_trainer.manifest import stamped_sha256

    path = tmp_path / "fresh.bin"
    path.write_bytes(b"x" * 1000)
    sha256_file(path)
    assert stamped_sha256(path) is None
