"""The checkpoint store: published merge results on any fsspec filesystem.

Layout under the store URL::

    checkpoints/<key>/<files>            weights, config, tokenizer, ...
    checkpoints/<key>/manifest.json      written last; lists every file with its sha256 and size
    .staging/<key>.<random>/             local stores only: folders being written

A checkpoint exists only when its manifest exists and every file the manifest
lists is present with the listed size. A writer that dies before the manifest
is written therefore leaves nothing a reader would use.

Keys are content-addressed: the caller derives a key from the recipe and its
inputs, so two writers of one key write the same files. Publishing is safe
under that assumption:

* Local stores build the whole folder, manifest included, in ``.staging`` on
  the same filesystem and ``os.rename`` it to ``checkpoints/<key>``. The rename
  is atomic and fails when the target already holds a checkpoint, in which
  case the loser discards its copy and returns the winner's reference.
* Remote stores (s3, gcs, ...) have no atomic folder rename. Writers upload the
  files, which at worst overwrites objects with identical bytes, and then
  create the manifest with an exclusive write (S3 ``If-None-Match: *``). A
  reader never sees a manifest before all files are uploaded.

NOTE: if two writers of one remote key produce different bytes (a merge that
is not bit-reproducible across machines), the stored files may not match the
manifest. The losing writer logs a warning, and ``verify(key, deep=True)``
detects the mismatch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict

from evomerge.exceptions import EvoMergeException, StoreError, TransientStoreError

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STAGING_DIR = ".staging"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
CHUNK_BYTES = 8 * 1024 * 1024

# errno values that retrying cannot fix: missing paths, permissions, full disks, invalid requests.
PERMANENT_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EINVAL,
    errno.ENAMETOOLONG,
    errno.EMSGSIZE,
    errno.EEXIST,
    errno.ENOTDIR,
    errno.EISDIR,
}
# S3 error codes that mean "slow down" or "try again"; HTTP 5xx is transient too.
TRANSIENT_S3_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed"}


class CheckpointRef(BaseModel):
    """A published checkpoint, small enough to pass between Prefect tasks."""

    model_config = ConfigDict(frozen=True)

    key: str
    uri: str
    manifest_sha256: str
    size_bytes: int


def sha256_file(path: str | os.PathLike) -> str:
    """Hash a local file with SHA-256 and return the hex digest."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _translate_error(error: BaseException, action: str, target: str) -> EvoMergeException | None:
    """Map a filesystem or S3 error to ``StoreError`` or ``TransientStoreError``; None if it is neither."""
    try:
        import botocore.exceptions as boto_errors
    except ImportError:
        boto_errors = None

    if boto_errors is not None:
        if isinstance(error, boto_errors.NoCredentialsError):
            return StoreError(
                f"{action} failed for {target}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or pass storage_options={'key': ..., 'secret': ...}"
            )
        if isinstance(error, boto_errors.ClientError):
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = error.response.get("Error", {}).get("Code", "")
            if status >= 500 or code in TRANSIENT_S3_CODES:
                return TransientStoreError(f"{action} failed for {target}: server error {code} (HTTP {status}); retry later")
            return StoreError(f"{action} failed for {target}: {code} (HTTP {status}): {error}")
        # botocore's ConnectionError covers refused connections and connect timeouts, and
        # HTTPClientError covers read timeouts and connections closed mid-request.
        if isinstance(error, (boto_errors.ConnectionError, boto_errors.HTTPClientError)):
            return TransientStoreError(f"{action} failed for {target}: {error}; check the endpoint and network, then retry")
        if isinstance(error, boto_errors.BotoCoreError):
            return StoreError(f"{action} failed for {target}: {error}; check storage_options and the AWS settings")

    if isinstance(error, (ConnectionError, TimeoutError)):
        return TransientStoreError(f"{action} failed for {target}: {error}; check the endpoint and network, then retry")
    if isinstance(error, FileNotFoundError):
        return StoreError(f"{action} failed: {target} not found ({error}); check the store URL (and the bucket, if any)")
    if isinstance(error, PermissionError):
        return StoreError(f"{action} failed for {target}: permission denied ({error}); check credentials and access rights")
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreError(f"{action} failed for {target}: no space left ({error}); free disk space or change the store")
        if error.errno in PERMANENT_ERRNOS:
            return StoreError(f"{action} failed for {target}: {error}")
        return TransientStoreError(f"{action} failed for {target}: {error}; retry later")

    module = type(error).__module__
    if module.startswith("aiohttp"):
        return TransientStoreError(f"{action} failed for {target}: {error}; check the endpoint and network, then retry")
    return None


class CheckpointStore:
    """Publish, find, pull and delete checkpoints under one fsspec URL.

    ``url`` is a local path, ``file://`` URL, ``s3://bucket/prefix`` or any
    fsspec URL. S3 reads credentials and the endpoint from the usual ``AWS_*``
    variables (``AWS_ENDPOINT_URL`` included) or from ``storage_options`` such
    as ``{"endpoint_url": ..., "key": ..., "secret": ...}``. ``cache_dir`` contains
    local copies of remote checkpoints and the staging folders of remote
    publishes; a local store does not use it.
    """

    def __init__(
        self,
        url: str | os.PathLike,
        *,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.cache_dir = Path(cache_dir).resolve() if cache_dir is not None else None

        with self._errors("open the store", self.url):
            try:
                self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
            except (ImportError, ValueError, TypeError) as error:
                raise StoreError(
                    f"store URL {self.url!r} cannot be opened ({error}): check the protocol and storage_options, "
                    "and install the fsspec backend it needs (s3fs for s3://, gcsfs for gs://)"
                ) from error
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/") if root != "/" else root

        if self.is_local:
            with self._errors("create the store folder", self.root):
                os.makedirs(self._path(CHECKPOINTS_DIR), exist_ok=True)
                os.makedirs(self._path(STAGING_DIR), exist_ok=True)
        else:
            self._check_bucket()

    # ----- paths and errors

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _checkpoint_path(self, key: str, *parts: str) -> str:
        return self._path(CHECKPOINTS_DIR, key, *parts)

    def _uri(self, key: str) -> str:
        return self.fs.unstrip_protocol(self._checkpoint_path(key)).rstrip("/") + "/"

    @contextlib.contextmanager
    def _errors(self, action: str, target: str) -> Iterator[None]:
        """Re-raise filesystem and network errors as ``StoreError`` or ``TransientStoreError``."""
        try:
            yield
        except EvoMergeException:
            raise
        except Exception as error:
            translated = _translate_error(error, action, target)
            if translated is None:
                raise
            logger.debug("%s (%s)", translated, type(error).__name__)
            raise translated from error

    def _check_bucket(self) -> None:
        """Raise ``StoreError`` naming the bucket when an s3/gcs store points at a missing one."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if protocol not in ("s3", "s3a", "gs", "gcs", "abfs", "az"):
            return
        bucket = self.root.split("/", 1)[0]
        with self._errors("check the bucket", f"{protocol}://{bucket}"):
            try:
                self.fs.info(bucket)
            except FileNotFoundError:
                raise StoreError(
                    f"bucket {bucket!r} of store {self.url!r} does not exist or is not visible with these "
                    f"credentials: create it (e.g. `aws s3 mb s3://{bucket}`) or fix the store URL and endpoint"
                ) from None

    @staticmethod
    def _check_key(key: str) -> str:
        if not isinstance(key, str) or not KEY_PATTERN.match(key):
            raise StoreError(
                f"checkpoint key {key!r} is invalid: use 1-200 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return key

    def _require_cache_dir(self) -> Path:
        if self.cache_dir is None:
            raise StoreError(f"store {self.url!r} is remote and needs a local cache: pass cache_dir=... to CheckpointStore")
        return self.cache_dir

    # ----- reading

    def _manifest_bytes(self, key: str) -> bytes | None:
        """Return the raw manifest of ``key``, or None when it is missing."""
        path = self._checkpoint_path(key, MANIFEST_NAME)
        if not self.is_local:
            self.fs.invalidate_cache(self._checkpoint_path(key))
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    @staticmethod
    def _parse_manifest(key: str, data: bytes) -> dict[str, Any] | None:
        try:
            manifest = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            logger.warning("manifest of checkpoint %s is not valid JSON (%s); treating it as missing", key, error)
            return None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            logger.warning("manifest of checkpoint %s has no 'files' mapping; treating it as missing", key)
            return None
        for name in manifest["files"]:
            if name.startswith("/") or ".." in name.split("/"):
                logger.warning("manifest of checkpoint %s lists the unsafe path %r; treating it as missing", key, name)
                return None
        return manifest

    def _listed_sizes(self, key: str) -> dict[str, int]:
        """Return {relative name: size} of every file stored under ``checkpoints/<key>/``."""
        prefix = self._checkpoint_path(key)
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        sizes = {}
        for path, info in found.items():
            relative = posixpath.relpath(self.fs._strip_protocol(path), prefix)
            sizes[relative] = int(info.get("size") or 0)
        return sizes

    def _complete_manifest(self, key: str) -> tuple[bytes, dict[str, Any]] | None:
        """Return the manifest bytes and content when the checkpoint is complete, else None."""
        data = self._manifest_bytes(key)
        if data is None:
            return None
        manifest = self._parse_manifest(key, data)
        if manifest is None:
            return None

        sizes = self._listed_sizes(key)
        for name, entry in manifest["files"].items():
            if sizes.get(name) != entry.get("size"):
                logger.warning(
                    "checkpoint %s is incomplete: file %s has size %s, expected %s from the manifest",
                    key, name, sizes.get(name), entry.get("size"),
                )
                return None
        return data, manifest

    def _ref(self, key: str, data: bytes, manifest: dict[str, Any]) -> CheckpointRef:
        return CheckpointRef(
            key=key,
            uri=self._uri(key),
            manifest_sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=sum(int(entry["size"]) for entry in manifest["files"].values()),
        )

    def exists(self, key: str) -> bool:
        """Check that the manifest of ``key`` exists and every file it lists is present with its size."""
        self._check_key(key)
        with self._errors("check checkpoint", self._uri(key)):
            return self._complete_manifest(key) is not None

    def get(self, key: str) -> CheckpointRef | None:
        """Return the reference of a complete checkpoint, or None when it does not exist."""
        self._check_key(key)
        with self._errors("read checkpoint", self._uri(key)):
            complete = self._complete_manifest(key)
        if complete is None:
            return None
        return self._ref(key, *complete)

    def read_manifest(self, key: str) -> dict[str, Any]:
        """Read and parse the manifest of ``key``; raise ``StoreError`` when it is missing or invalid."""
        self._check_key(key)
        with self._errors("read manifest", self._uri(key)):
            data = self._manifest_bytes(key)
        manifest = None if data is None else self._parse_manifest(key, data)
        if manifest is None:
            raise StoreError(
                f"checkpoint {key!r} has no valid manifest in store {self.url!r}: it was never published, "
                "was deleted, or its publish did not finish; publish it again"
            )
        return manifest

    def keys(self) -> list[str]:
        """List the keys that have a manifest, sorted; completeness is not checked (use ``exists``)."""
        pattern = self._path(CHECKPOINTS_DIR, "*", MANIFEST_NAME)
        with self._errors("list checkpoints", self.url):
            if not self.is_local:
                self.fs.invalidate_cache(self._path(CHECKPOINTS_DIR))
            paths = self.fs.glob(pattern)
        return sorted(posixpath.basename(posixpath.dirname(self.fs._strip_protocol(p))) for p in paths)

    def verify(self, key: str, deep: bool = False) -> bool:
        """Check that ``key`` is complete; with ``deep`` also re-hash every file against its sha256."""
        self._check_key(key)
        with self._errors("verify checkpoint", self._uri(key)):
            complete = self._complete_manifest(key)
            if complete is None:
                return False
            if not deep:
                return True

            _, manifest = complete
            for name, entry in sorted(manifest["files"].items()):
                digest = hashlib.sha256()
                with self.fs.open(self._checkpoint_path(key, name), "rb") as handle:
                    while chunk := handle.read(CHUNK_BYTES):
                        digest.update(chunk)
                if digest.hexdigest() != entry["sha256"]:
                    logger.warning(
                        "checkpoint %s: file %s has sha256 %s, expected %s from the manifest",
                        key, name, digest.hexdigest(), entry["sha256"],
                    )
                    return False
        return True

    # ----- writing

    @contextlib.contextmanager
    def staging_dir(self, key: str) -> Iterator[Path]:
        """Yield an empty local folder to write a checkpoint into; it is removed on exit unless published.

        A local store stages inside its own root so ``publish`` is a rename. A
        remote store stages under ``cache_dir``.
        """
        self._check_key(key)
        if self.is_local:
            base = Path(self._path(STAGING_DIR))
        else:
            base = self._require_cache_dir() / STAGING_DIR
        path = base / f"{key}.{uuid.uuid4().hex}"
        with self._errors("create staging folder", str(path)):
            path.mkdir(parents=True)
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _local_files(local_dir: Path) -> dict[str, dict[str, Any]]:
        """Hash every file under ``local_dir``; return {relative posix name: {sha256, size}}."""
        files = {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            relative = path.relative_to(local_dir).as_posix()
            files[relative] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        return files

    def _manifest_payload(self, key: str, recipe: dict, extra: dict | None, files: dict) -> bytes:
        manifest = {
            "format": MANIFEST_FORMAT,
            "key": key,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "recipe": recipe,
            "extra": extra or {},
            "files": files,
        }
        try:
            return json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as error:
            raise StoreError(
                f"recipe or extra of checkpoint {key!r} cannot be written as JSON ({error}): "
                "use only str, int, finite float, bool, None, lists and dicts"
            ) from None

    def _is_staging_folder(self, path: Path) -> bool:
        bases = []
        if self.is_local:
            bases.append(Path(self._path(STAGING_DIR)).resolve())
        if self.cache_dir is not None:
            bases.append(self.cache_dir / STAGING_DIR)
        resolved = path.resolve()
        return any(resolved.parent == base for base in bases)

    def _discard(self, local_dir: Path) -> None:
        """Remove ``local_dir`` when it is one of this store's staging folders; leave other folders alone."""
        if self._is_staging_folder(local_dir):
            shutil.rmtree(local_dir, ignore_errors=True)

    def publish(
        self,
        key: str,
        local_dir: str | os.PathLike,
        recipe: dict,
        extra: dict | None = None,
    ) -> CheckpointRef:
        """Store the files of ``local_dir`` as checkpoint ``key``, manifest last, and return its reference.

        When ``key`` already exists, the existing checkpoint is kept and
        returned. A staging folder from ``staging_dir`` is consumed (moved or
        removed); any other folder is copied and left as it was.
        """
        self._check_key(key)
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StoreError(f"cannot publish {key!r}: {str(local_dir)!r} is not a folder; write the checkpoint there first")

        existing = self.get(key)
        if existing is not None:
            logger.info("checkpoint %s already in store %s; keeping the stored copy", key, self.url)
            self._discard(local_dir)
            return existing

        with self._errors("hash checkpoint files", str(local_dir)):
            files = self._local_files(local_dir)
        if not files:
            raise StoreError(f"cannot publish {key!r}: folder {str(local_dir)!r} contains no files")
        if MANIFEST_NAME in files:
            raise StoreError(
                f"cannot publish {key!r}: {str(local_dir)!r} already contains {MANIFEST_NAME}, a name the store "
                "reserves for its manifest; rename that file"
            )
        payload = self._manifest_payload(key, recipe, extra, files)

        if self.is_local:
            return self._publish_local(key, local_dir, payload)
        return self._publish_remote(key, local_dir, payload, files)

    def _publish_local(self, key: str, local_dir: Path, payload: bytes) -> CheckpointRef:
        """Complete a staging folder with its manifest and rename it to ``checkpoints/<key>``."""
        target = Path(self._checkpoint_path(key))
        with self._errors("publish checkpoint", self._uri(key)):
            target.parent.mkdir(parents=True, exist_ok=True)
            if self._is_staging_folder(local_dir):
                staged = local_dir
            else:
                staged = Path(self._path(STAGING_DIR)) / f"{key}.{uuid.uuid4().hex}"
                shutil.copytree(local_dir, staged)

            manifest_path = staged / MANIFEST_NAME
            with open(manifest_path, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())

            for attempt in range(2):
                try:
                    os.rename(staged, target)
                    break
                except OSError as error:
                    if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                winner = self.get(key)
                if winner is not None:
                    logger.info("checkpoint %s was published by another writer first; discarding this copy", key)
                    shutil.rmtree(staged, ignore_errors=True)
                    return winner
                if attempt == 1:
                    raise StoreError(f"cannot publish {key!r}: {str(target)!r} keeps reappearing without a manifest")
                self._remove_incomplete_local(key)

        logger.info("published checkpoint %s to %s", key, self._uri(key))
        return self._ref(key, payload, json.loads(payload))

    def _remove_incomplete_local(self, key: str) -> None:
        """Move an incomplete ``checkpoints/<key>`` (no manifest) aside and delete it."""
        target = Path(self._checkpoint_path(key))
        aside = Path(self._path(STAGING_DIR)) / f"{key}.incomplete.{uuid.uuid4().hex}"
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            return
        logger.warning("removed incomplete checkpoint folder %s (it had no manifest)", target)
        shutil.rmtree(aside, ignore_errors=True)

    def _publish_remote(self, key: str, local_dir: Path, payload: bytes, files: dict) -> CheckpointRef:
        """Upload every file, then create the manifest with an exclusive write."""
        manifest_path = self._checkpoint_path(key, MANIFEST_NAME)
        with self._errors("upload checkpoint", self._uri(key)):
            for name in sorted(files):
                self.fs.put_file(str(local_dir / name), self._checkpoint_path(key, name))

            try:
                with self.fs.open(manifest_path, "xb") as handle:
                    handle.write(payload)
            except FileExistsError:
                return self._lost_remote_race(key, local_dir, files)
            except (ValueError, NotImplementedError):
                # Filesystems without exclusive create: a concurrent writer of the same key may overwrite
                # this manifest with its own, which lists the same hashes when the merge is reproducible.
                self.fs.pipe_file(manifest_path, payload)

        logger.info("published checkpoint %s to %s", key, self._uri(key))
        with self._errors("move the published checkpoint into the cache", str(local_dir)):
            self._keep_as_cache(key, local_dir, payload)
        return self._ref(key, payload, json.loads(payload))

    def _lost_remote_race(self, key: str, local_dir: Path, files: dict) -> CheckpointRef:
        """Return the other writer's checkpoint after its manifest won the exclusive create."""
        winner = self.get(key)
        if winner is None:
            raise TransientStoreError(
                f"checkpoint {key!r} was published concurrently and is not complete yet in {self.url!r}; retry"
            )
        theirs = self.read_manifest(key)["files"]
        differing = sorted(name for name in files if theirs.get(name, {}).get("sha256") != files[name]["sha256"])
        if differing:
            # Keys are content-addressed, so this means the merge is not bit-reproducible across writers.
            logger.warning(
                "checkpoint %s was published concurrently with different bytes in %s; "
                "run verify(%r, deep=True) and delete it if it fails",
                key, differing, key,
            )
        else:
            logger.info("checkpoint %s was published by another writer first; discarding this copy", key)
        self._discard(local_dir)
        return winner

    def _keep_as_cache(self, key: str, local_dir: Path, payload: bytes) -> None:
        """Move a published remote staging folder into the cache so ``local_path`` needs no download."""
        if not self._is_staging_folder(local_dir):
            return
        (local_dir / MANIFEST_NAME).write_bytes(payload)
        cached = self._require_cache_dir() / key
        self._replace_cache(key, local_dir, cached)

    # ----- local copies

    def _cached_copy_valid(self, cached: Path, data: bytes, manifest: dict) -> bool:
        """Check a cached folder against the store's manifest: same manifest bytes and file sizes."""
        cached_manifest = cached / MANIFEST_NAME
        if not cached_manifest.is_file() or cached_manifest.read_bytes() != data:
            return False
        for name, entry in manifest["files"].items():
            path = cached / name
            if not path.is_file() or path.stat().st_size != entry["size"]:
                return False
        return True

    def _replace_cache(self, key: str, staged: Path, cached: Path) -> None:
        """Rename ``staged`` to ``cached``, moving any stale copy aside first."""
        for _ in range(2):
            try:
                os.rename(staged, cached)
                return
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            aside = cached.parent / STAGING_DIR / f"{key}.stale.{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(cached, aside)
                shutil.rmtree(aside, ignore_errors=True)
        shutil.rmtree(staged, ignore_errors=True)

    def local_path(self, ref_or_key: CheckpointRef | str) -> Path:
        """Return a local folder with the checkpoint's files.

        A local store returns the checkpoint folder itself. A remote store
        downloads into ``cache_dir/<key>`` (to a temporary folder first,
        checking every sha256, then renamed) and reuses a cached copy whose
        manifest and file sizes match the store.
        """
        key = ref_or_key.key if isinstance(ref_or_key, CheckpointRef) else ref_or_key
        self._check_key(key)
        with self._errors("read checkpoint", self._uri(key)):
            complete = self._complete_manifest(key)
        if complete is None:
            raise StoreError(
                f"checkpoint {key!r} does not exist in store {self.url!r} (no manifest, or files missing): "
                "publish it first or check the key"
            )
        data, manifest = complete
        if isinstance(ref_or_key, CheckpointRef) and ref_or_key.manifest_sha256 != hashlib.sha256(data).hexdigest():
            logger.warning("checkpoint %s was republished since this reference was made; using the stored one", key)

        if self.is_local:
            return Path(self._checkpoint_path(key))

        cache_dir = self._require_cache_dir()
        cached = cache_dir / key
        if self._cached_copy_valid(cached, data, manifest):
            logger.debug("using cached copy of checkpoint %s at %s", key, cached)
            return cached
        if cached.exists():
            logger.info("cached copy of checkpoint %s at %s is stale or damaged; pulling it again", key, cached)
            shutil.rmtree(cached, ignore_errors=True)

        temporary = cache_dir / STAGING_DIR / f"{key}.{uuid.uuid4().hex}"
        try:
            with self._errors("download checkpoint", self._uri(key)):
                temporary.mkdir(parents=True)
                self._download(key, manifest, temporary)
                (temporary / MANIFEST_NAME).write_bytes(data)
                self._replace_cache(key, temporary, cached)
        finally:
            if temporary.exists():
                shutil.rmtree(temporary, ignore_errors=True)
        logger.info("pulled checkpoint %s into %s", key, cached)
        return cached

    def _download(self, key: str, manifest: dict, destination: Path) -> None:
        """Download every manifest file into ``destination``, hashing while writing."""
        for name, entry in sorted(manifest["files"].items()):
            path = destination / name
            path.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with self.fs.open(self._checkpoint_path(key, name), "rb") as source, open(path, "wb") as sink:
                while chunk := source.read(CHUNK_BYTES):
                    digest.update(chunk)
                    sink.write(chunk)
            if digest.hexdigest() != entry["sha256"]:
                raise StoreError(
                    f"checkpoint {key!r} file {name!r} in store {self.url!r} has sha256 {digest.hexdigest()}, "
                    f"but the manifest says {entry['sha256']}: the stored copy is corrupt; delete the key and rebuild it"
                )

    # ----- deleting

    def delete(self, key: str) -> None:
        """Delete checkpoint ``key``: the manifest first, so readers stop using it, then its files."""
        self._check_key(key)
        with self._errors("delete checkpoint", self._uri(key)):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._checkpoint_path(key, MANIFEST_NAME))
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._checkpoint_path(key), recursive=True)
        if self.cache_dir is not None:
            shutil.rmtree(self.cache_dir / key, ignore_errors=True)
        logger.info("deleted checkpoint %s from %s", key, self.url)

    def retain(self, keep: set[str]) -> list[str]:
        """Delete every checkpoint whose key is not in ``keep``; return the deleted keys, sorted."""
        stored = self.keys()
        deleted = [key for key in stored if key not in keep]
        for key in deleted:
            self.delete(key)
        logger.info("retention kept %d and deleted %d checkpoints in %s", len(stored) - len(deleted), len(deleted), self.url)
        return deleted

    def clean_staging(self, older_than_seconds: float = 24 * 3600) -> list[str]:
        """Delete staging folders left by killed writers; return their names.

        Only folders not modified for ``older_than_seconds`` are removed, so a
        publish still in progress in another process is left alone as long as
        it is younger than that.
        """
        bases = [Path(self._path(STAGING_DIR))] if self.is_local else []
        if self.cache_dir is not None:
            bases.append(self.cache_dir / STAGING_DIR)
        cutoff = time.time() - older_than_seconds
        removed = []
        for base in bases:
            if not base.is_dir():
                continue
            for folder in sorted(base.iterdir()):
                if folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder.name)
        if removed:
            logger.info("removed %d stale staging folders from %s", len(removed), self.url)
        return removed

    # ----- other files

    def _relative_path(self, relative: str) -> str:
        parts = relative.replace("\\", "/").split("/")
        if not relative or relative.startswith("/") or ".." in parts or "" in parts:
            raise StoreError(
                f"store path {relative!r} is invalid: give a relative path such as 'ledger/runs.parquet' "
                "without '..', a leading '/' or empty parts"
            )
        return self._path(*parts)

    def write_bytes(self, relative: str, data: bytes) -> str:
        """Write ``data`` to ``relative`` under the store root, replacing it atomically on local stores."""
        path = self._relative_path(relative)
        with self._errors("write", self.fs.unstrip_protocol(path)):
            if self.is_local:
                os.makedirs(posixpath.dirname(path), exist_ok=True)
                temporary = f"{path}.{uuid.uuid4().hex}.tmp"
                with open(temporary, "wb") as handle:
                    handle.write(data)
                os.replace(temporary, path)
            else:
                self.fs.pipe_file(path, data)
        return self.fs.unstrip_protocol(path)

    def read_bytes(self, relative: str) -> bytes:
        """Read the file at ``relative`` under the store root."""
        path = self._relative_path(relative)
        with self._errors("read", self.fs.unstrip_protocol(path)):
            return self.fs.cat_file(path)

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r})"
