"""Local paths and `s3://bucket/key` URIs behind one small API. Importable without torch.

S3 settings come from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION
(default us-east-1), AWS_ENDPOINT_URL (SeaweedFS, MinIO, Ceph ...) and MOT_S3_PATH_STYLE=true for
path-style addressing. Transfers are multipart and parallel; transient errors are retried with
backoff by botocore ("standard" mode, MOT_S3_MAX_ATTEMPTS attempts, default 8).

Missing or refused credentials and a missing bucket raise StorageAccessError (an InvalidInput: exit
2, never retried) saying what to set; a missing input object raises NotFound (also exit 2).

A checkpoint is uploaded file by file with the manifest last, after removing any old manifest, so a
reader never sees a manifest next to files it does not describe. Readers download only the files the
manifest lists and verify each one before it is used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mot_trainer.errors import InvalidInput
from mot_trainer.manifest import MANIFEST_NAME, load_manifest, parse_manifest, verify_folder

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
_PARALLEL_FILES = 4


class NotFound(FileNotFoundError, InvalidInput):
    """The object or file does not exist. An InvalidInput (exit 2) unless a caller handles it."""


class StorageAccessError(InvalidInput):
    """S3 refused the request for a reason no retry can fix: no credentials, wrong credentials, access
    denied, or a bucket that does not exist. Not a FileNotFoundError: callers that treat a missing
    object as "not written yet" still fail on it."""


CREDENTIALS_HINT = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in a cluster: spec.storage.credentialsSecret)"
# Error codes S3 (and SeaweedFS, MinIO, Ceph) answer for credentials it does not accept. "403" is what
# a HEAD request gets: its response has no body to carry a code.
_CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken", "ExpiredToken",
    "InvalidSecurity", "AllAccessDisabled",
})


def is_s3(uri) -> bool:
    return str(uri).startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise InvalidInput(f"{uri!r}: no bucket name")
    return bucket, key


def join(uri, *parts: str) -> str:
    """Join path segments onto a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        segments = [uri.rstrip("/")] + [str(p).strip("/") for p in parts if str(p).strip("/")]
        return "/".join(segments)
    return str(Path(uri, *parts))


# --- S3 client ---------------------------------------------------------------------------------


def _env_settings() -> tuple:
    env = os.environ
    return (
        env.get("AWS_ENDPOINT_URL") or None,
        env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        env.get("AWS_ACCESS_KEY_ID"),
        env.get("AWS_SECRET_ACCESS_KEY"),
        env.get("AWS_SESSION_TOKEN"),
        env.get("MOT_S3_PATH_STYLE", "").strip().lower() in ("1", "true", "yes", "on"),
        int(env.get("MOT_S3_MAX_ATTEMPTS", "8")),
    )


def s3_client():
    """A boto3 S3 client for the current environment (cached per distinct setting)."""
    return _client_for(_env_settings())


@functools.lru_cache(maxsize=8)
def _client_for(settings: tuple):
    import boto3  # boto3 on first S3 use only (here and below): importing storage stays light
    from botocore.config import Config

    endpoint, region, key, secret, token, path_style, attempts = settings
    config = Config(
        region_name=region,
        retries={"total_max_attempts": attempts, "mode": "standard"},
        s3={"addressing_style": "path" if path_style else "auto"},
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=32,
    )
    session = boto3.session.Session(
        aws_access_key_id=key, aws_secret_access_key=secret, aws_session_token=token, region_name=region
    )
    return session.client("s3", endpoint_url=endpoint, config=config)


@functools.cache
def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=8, use_threads=True
    )


def _error_code(exc: BaseException) -> str:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return ""
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_not_found(exc: Exception) -> bool:
    """A missing object (a missing bucket is an access error, see access_error)."""
    return _error_code(exc) in ("404", "NoSuchKey", "NotFound")


def _causes(exc: BaseException):
    """exc and the exceptions it was raised from (boto3's transfer manager wraps ClientError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def access_error(exc: BaseException, uri: str) -> StorageAccessError | None:
    """The StorageAccessError `exc` amounts to, or None when it is something else (a missing object,
    throttling, a 5xx, a dropped connection: those keep their own handling or stay retryable)."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    for cause in _causes(exc):
        if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
            return StorageAccessError(f"{uri}: no S3 credentials ({cause}); {CREDENTIALS_HINT}")
        code = _error_code(cause)
        if code in _CREDENTIAL_CODES:
            message = cause.response.get("Error", {}).get("Message") or "access refused"
            return StorageAccessError(
                f"{uri}: the S3 credentials were refused ({code}: {message}); {CREDENTIALS_HINT}, "
                f"with access to this bucket"
            )
        if code == "NoSuchBucket":
            bucket = split_s3(uri)[0]
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
            return StorageAccessError(
                f"{uri}: bucket {bucket} does not exist at {endpoint} "
                f"(check the bucket in this URI, and the endpoint: AWS_ENDPOINT_URL, in a cluster spec.storage.endpoint)"
            )
    return None


@contextlib.contextmanager
def _s3_errors(uri: str):
    """Re-raise credential and missing-bucket failures of the S3 calls inside as StorageAccessError."""
    try:
        yield
    except InvalidInput:
        raise
    except Exception as exc:
        error = access_error(exc, uri)
        if error is not None:
            raise error from None
        raise


# --- single objects ----------------------------------------------------------------------------


def read_bytes(uri) -> bytes:
    """The whole object or file. Raises NotFound (a FileNotFoundError) when it does not exist."""
    uri = str(uri)
    if not is_s3(uri):
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{uri}: no such file") from None
    bucket, key = split_s3(uri)
    try:
        with _s3_errors(uri):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except StorageAccessError:
        raise
    except Exception as exc:
        if _is_not_found(exc):
            raise NotFound(f"{uri}: no such object") from None
        raise


def write_bytes(uri, data: bytes) -> None:
    """Write a whole object or file; a local file appears atomically (temp file + rename)."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_json(uri) -> dict:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{uri}: not valid JSON ({exc})") from None


def write_json(uri, obj) -> None:
    write_bytes(uri, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def exists(uri) -> bool:
    """True for an existing file/folder, or an s3:// object or non-empty prefix. Nothing exists in a
    missing bucket (False); refused credentials raise StorageAccessError."""
    uri = str(uri)
    if not is_s3(uri):
        return os.path.exists(uri)
    bucket, key = split_s3(uri)
    client = s3_client()
    with _s3_errors(uri):
        if key and not key.endswith("/"):
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except Exception as exc:
                if not _is_not_found(exc):
                    raise
        prefix = key.rstrip("/") + "/" if key else ""
        try:
            listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except Exception as exc:
            if _is_not_found(exc) or _error_code(exc) == "NoSuchBucket":
                return False
            raise
    return listing.get("KeyCount", 0) > 0


def delete(uri) -> None:
    """Remove one object or file; a missing one is fine."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def list_keys(uri) -> list[str]:
    """Relative paths of every object under an s3:// prefix (or file under a local folder)."""
    uri = str(uri)
    if not is_s3(uri):
        root = Path(uri)
        return [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    keys = []
    with _s3_errors(uri):
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"][len(prefix) :] for obj in page.get("Contents", []))
    return sorted(k for k in keys if k)


# --- checkpoint folders ------------------------------------------------------------------------


def download_dir(uri, local_dir, verify: bool = True) -> Path:
    """Make a checkpoint folder available locally and return its local path.

    With `verify`, the manifest must exist and every listed file must match its size and sha256
    (InvalidInput naming the file otherwise); only listed files are fetched. Without `verify` (e.g.
    a user's base model that has no manifest), everything under the prefix is fetched.
    A local `uri` is not copied: it is verified in place and returned as is.

    A `local_dir` already holding a complete download of `uri` (the same manifest, its files intact;
    or, unverified, a completion record naming the same keys) is reused, not fetched again: the
    processes of one node share one download (sft). Files land under a per-process temporary name,
    so two processes fetching into one folder at once never see each other's partial files.
    """
    uri = str(uri)
    if not is_s3(uri):
        if not Path(uri).is_dir():
            raise NotFound(f"{uri}: no such folder")
        if verify:
            verify_folder(uri)
        return Path(uri)
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    if verify:
        manifest_uri = join(uri, MANIFEST_NAME)
        try:
            raw = read_bytes(manifest_uri)
        except FileNotFoundError:
            raise InvalidInput(f"{uri}: no {MANIFEST_NAME}; the checkpoint is incomplete") from None
        rels = [entry["path"] for entry in parse_manifest(raw, manifest_uri)["files"]]
        if _holds(local, raw):
            log.info("%s already downloaded to %s", uri, local)
            return local
    else:
        rels = list_keys(uri)
        if not rels:
            raise NotFound(f"{uri}: no objects under this prefix")
        raw = None
        record = json.dumps(sorted(rels)).encode()
        done = _completion_record(local)
        if done.exists() and done.read_bytes() == record and all((local / rel).is_file() for rel in rels):
            log.info("%s already downloaded to %s", uri, local)
            return local
    _parallel(lambda rel: _download_file(join(uri, rel), local / rel), rels)
    if raw is not None:
        write_bytes(local / MANIFEST_NAME, raw)  # last, atomically: it marks the folder complete
        verify_folder(local)
    else:
        write_bytes(_completion_record(local), record)
    log.info("downloaded %d files from %s to %s", len(rels), uri, local)
    return local


def read_checkpoint_manifest(uri: str) -> dict | None:
    """The manifest at a local or s3:// checkpoint URI (structure checked), or None when there is none
    yet. Does not hash the files: use download_dir / verify_folder before using them."""
    location = join(uri, MANIFEST_NAME)
    try:
        data = read_bytes(location)
    except FileNotFoundError:
        return None
    return parse_manifest(data, location)


def _completion_record(local: Path) -> Path:
    """Written last beside a folder downloaded without a manifest: the keys it holds, all complete.
    Beside, not inside: the folder holds exactly the model's files (a merge hashes them all)."""
    return local.with_name(f"{local.name}.mot-download-complete")


def _holds(local: Path, manifest_raw: bytes) -> bool:
    """`local` has this manifest and every file it lists, intact (hashes cached: cheap when unchanged)."""
    path = local / MANIFEST_NAME
    if not path.is_file() or path.read_bytes() != manifest_raw:
        return False
    try:
        verify_folder(local)
    except InvalidInput:
        return False
    return True


def _download_file(uri: str, dest: Path) -> None:
    bucket, key = split_s3(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
    try:
        with _s3_errors(uri):
            s3_client().download_file(bucket, key, str(part), Config=_transfer_config())
    except Exception as exc:
        part.unlink(missing_ok=True)
        if not isinstance(exc, InvalidInput) and _is_not_found(exc):
            raise InvalidInput(f"{uri}: listed in {MANIFEST_NAME} but missing") from None
        raise
    os.replace(part, dest)


def upload_checkpoint(local_dir, uri) -> None:
    """Copy a finished checkpoint folder (its manifest already written) to `uri`, manifest last.

    Any manifest already at the destination is removed first, so a reader sees either no manifest
    or one that describes exactly the files present.
    """
    src = Path(local_dir)
    manifest = load_manifest(src)  # the folder must be complete before anyone may read it
    rels = [entry["path"] for entry in manifest["files"]]
    uri = str(uri)
    if not is_s3(uri):
        dest = Path(uri)
        if dest.resolve() == src.resolve():
            return
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MANIFEST_NAME).unlink(missing_ok=True)
        _parallel(lambda rel: _copy_local(src / rel, dest / rel), rels)
        _copy_local(src / MANIFEST_NAME, dest / MANIFEST_NAME)
        return
    delete(join(uri, MANIFEST_NAME))
    _parallel(lambda rel: _upload_file(src / rel, join(uri, rel)), rels)
    _upload_file(src / MANIFEST_NAME, join(uri, MANIFEST_NAME))
    log.info("uploaded %d files and the manifest to %s", len(rels), uri)


def _upload_file(path: Path, uri: str) -> None:
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        s3_client().upload_file(str(path), bucket, key, Config=_transfer_config())


def _copy_local(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _parallel(fn, items) -> None:
    """Run fn over items on a few threads; the first error propagates."""
    items = list(items)
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(_PARALLEL_FILES, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()
