"""mot-manifest.json: written last, lists every file, verification names the bad file."""

import json

import pytest

from mot_trainer.errors import InvalidInput
from mot_trainer.manifest import (
    FORMAT,
    MANIFEST_NAME,
    read_checkpoint_manifest,
    sha256_file,
    verify_folder,
    write_manifest,
)


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
