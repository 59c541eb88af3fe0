"""Tests of the checkpoint store on a local folder and on a local moto S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import pytest

from evomerge.exceptions import StoreError, TransientStoreError
from evomerge.store import MANIFEST_NAME, CheckpointRef, CheckpointStore
from s3_server import TEST_CREDENTIALS, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = b"\x01\x02\x03\x04" * 256  # 1024 bytes
CONFIG = b'{"model_type": "llama"}'  # 23 bytes
RECIPE = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.5}}]}


def write_checkpoint_files(folder: Path, weights: bytes = WEIGHTS) -> None:
    """Write a two-file checkpoint, one file in a subfolder, as a merge would."""
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "config.json").write_bytes(CONFIG)


def publish_sample(store: CheckpointStore, key: str, weights: bytes = WEIGHTS) -> CheckpointRef:
    with store.staging_dir(key) as folder:
        write_checkpoint_files(folder, weights)
        return store.publish(key, folder, RECIPE, extra={"parents": ["p1"]})


def run_child(code: str, *args: str) -> subprocess.Popen:
    """Start a Python child process that imports from this repository."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_file(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


# ----- local store


def test_publish_local_ref_and_manifest(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    ref = publish_sample(store, "abc123")

    folder = tmp_path / "store" / "checkpoints" / "abc123"
    manifest_bytes = (folder / MANIFEST_NAME).read_bytes()
    manifest = json.loads(manifest_bytes)
    assert store.is_local
    assert ref.key == "abc123"
    assert ref.size_bytes == 1024 + 23
    assert ref.manifest_sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    assert ref.uri == f"file://{folder}/"
    assert manifest["recipe"] == RECIPE
    assert manifest["extra"] == {"parents": ["p1"]}
    assert manifest["files"]["model.safetensors"] == {"sha256": hashlib.sha256(WEIGHTS).hexdigest(), "size": 1024}
    assert manifest["files"]["tokenizer/config.json"] == {"sha256": hashlib.sha256(CONFIG).hexdigest(), "size": 23}
    assert store.exists("abc123")
    assert store.get("abc123") == ref
    assert store.local_path(ref) == folder
    assert store.read_manifest("abc123") == manifest
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


def test_publish_existing_key_keeps_first(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    first = publish_sample(store, "k1")

    second = publish_sample(store, "k1", weights=b"\xff" * 1024)

    stored = (tmp_path / "store" / "checkpoints" / "k1" / "model.safetensors").read_bytes()
    assert second == first
    assert stored == WEIGHTS
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


def test_publish_outside_folder_copies(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    source = tmp_path / "merged"
    source.mkdir()
    write_checkpoint_files(source)

    ref = store.publish("k2", source, RECIPE)

    assert ref.size_bytes == 1047
    assert (source / "model.safetensors").read_bytes() == WEIGHTS
    assert store.verify("k2", deep=True)


def test_get_missing_key_none(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    assert store.get("nothing") is None
    assert not store.exists("nothing")
    with pytest.raises(StoreError, match="has no valid manifest"):
        store.read_manifest("nothing")
    with pytest.raises(StoreError, match="does not exist"):
        store.local_path("nothing")


def test_invalid_key_and_path_rejected(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    with pytest.raises(StoreError, match="checkpoint key '../escape' is invalid"):
        store.exists("../escape")
    with pytest.raises(StoreError, match="store path '../x' is invalid"):
        store.write_bytes("../x", b"1")
    with pytest.raises(StoreError, match="is not a folder"):
        store.publish("k", tmp_path / "missing", RECIPE)


def test_unknown_protocol_rejected(tmp_path):
    with pytest.raises(StoreError, match="store URL 'nosuchfs://x' cannot be opened"):
        CheckpointStore("nosuchfs://x", cache_dir=tmp_path)


def test_publish_rejects_bad_inputs(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    with store.staging_dir("empty") as folder:
        with pytest.raises(StoreError, match="contains no files"):
            store.publish("empty", folder, RECIPE)
    with store.staging_dir("nan") as folder:
        write_checkpoint_files(folder)
        with pytest.raises(StoreError, match="cannot be written as JSON"):
            store.publish("nan", folder, {"weight": float("nan")})
    assert store.keys() == []


def test_staging_removed_without_publish(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    with store.staging_dir("k") as folder:
        write_checkpoint_files(folder)
        assert folder.parent == tmp_path / "store" / ".staging"
    assert not folder.exists()
    assert not store.exists("k")


def test_killed_writer_leaves_nothing(tmp_path):
    flag = tmp_path / "one-file-written"
    child = run_child(
        """
        import sys, time
        from pathlib import Path
        from evomerge.store import CheckpointStore
        store = CheckpointStore(sys.argv[1])
        with store.staging_dir("killed") as folder:
            (folder / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
            Path(sys.argv[2]).touch()
            time.sleep(60)
            (folder / "model-00002-of-00002.safetensors").write_bytes(b"y" * 100)
            store.publish("killed", folder, {})
        """,
        str(tmp_path / "store"),
        str(flag),
    )
    wait_for_file(flag)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)

    store = CheckpointStore(tmp_path / "store")
    assert not store.exists("killed")
    assert store.keys() == []
    assert publish_sample(store, "killed").size_bytes == 1047


def test_clean_staging_age_limit(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    staging = tmp_path / "store" / ".staging"
    (staging / "old.1234").mkdir()
    (staging / "new.5678").mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(staging / "old.1234", (two_days_ago, two_days_ago))

    assert store.clean_staging() == ["old.1234"]
    assert [path.name for path in staging.iterdir()] == ["new.5678"]


def test_folder_without_manifest_replaced(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    leftover = tmp_path / "store" / "checkpoints" / "half"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")

    assert not store.exists("half")
    assert store.keys() == []

    ref = publish_sample(store, "half")
    assert ref.size_bytes == 1047
    assert (leftover / "model.safetensors").read_bytes() == WEIGHTS


def test_vanished_or_changed_file(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    publish_sample(store, "gone")
    publish_sample(store, "short")
    publish_sample(store, "flipped")
    root = tmp_path / "store" / "checkpoints"

    (root / "gone" / "tokenizer" / "config.json").unlink()
    (root / "short" / "model.safetensors").write_bytes(WEIGHTS[:-1])
    (root / "flipped" / "model.safetensors").write_bytes(b"\x00" * 1024)

    assert not store.exists("gone")
    assert store.get("gone") is None
    assert not store.exists("short")
    assert store.exists("flipped")
    assert store.verify("flipped")
    assert not store.verify("flipped", deep=True)
    assert not store.verify("short")


# Each writer stages 20 identical shards, waits for the file argv[2] to appear, then publishes.
RACE_WRITER = """
    import json, logging, sys, time
    from pathlib import Path
    from evomerge.store import CheckpointStore
    logging.basicConfig(level=logging.INFO)
    store = CheckpointStore(sys.argv[1], storage_options=json.loads(sys.argv[3]), cache_dir=sys.argv[4])
    with store.staging_dir("race") as folder:
        for index in range(20):
            (folder / f"shard-{index:02d}.bin").write_bytes(bytes([index]) * 4096)
        while not Path(sys.argv[2]).exists():
            time.sleep(0.001)
        ref = store.publish("race", folder, {"method": "linear"})
    print(ref.model_dump_json())
"""


def test_two_processes_race_one_key(tmp_path):
    store_url = str(tmp_path / "store")
    CheckpointStore(store_url)
    go = tmp_path / "go"
    writer = RACE_WRITER
    writer_args = (store_url, str(go), "{}", str(tmp_path / "cache"))
    reader = """
        import sys, time
        from pathlib import Path
        from evomerge.store import CheckpointStore
        store = CheckpointStore(sys.argv[1])
        while not Path(sys.argv[2]).exists():
            time.sleep(0.001)
        deadline = time.monotonic() + 3
        seen = 0
        while time.monotonic() < deadline:
            if store.get("race") is not None:
                folder = store.local_path("race")
                files = sorted(p.name for p in folder.iterdir())
                assert len(files) == 21, files
                seen += 1
                if seen > 20:
                    break
        print(seen)
    """
    children = [run_child(writer, *writer_args), run_child(writer, *writer_args)]
    observer = run_child(reader, store_url, str(go))
    time.sleep(1.0)
    go.touch()
    outputs = [child.communicate(timeout=30) for child in children]
    observed = observer.communicate(timeout=30)

    refs = [CheckpointRef.model_validate_json(stdout) for stdout, _ in outputs]
    winners = [stderr for _, stderr in outputs if "published checkpoint race to" in stderr]
    store = CheckpointStore(store_url)
    assert [child.returncode for child in children] == [0, 0]
    assert len(winners) == 1
    assert observer.returncode == 0, observed[1]
    assert int(observed[0]) > 0
    assert refs[0] == refs[1]
    assert refs[0] == store.get("race")
    assert refs[0].size_bytes == 20 * 4096
    assert store.keys() == ["race"]
    assert store.verify("race", deep=True)
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


def test_retain_deletes_others(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    for key in ("a", "b", "c"):
        publish_sample(store, key)

    deleted = store.retain({"a", "not-stored"})

    assert deleted == ["b", "c"]
    assert store.keys() == ["a"]
    assert not (tmp_path / "store" / "checkpoints" / "b").exists()


def test_bytes_round_trip(tmp_path):
    store = CheckpointStore(f"file://{tmp_path}/store")
    uri = store.write_bytes("ledger/runs.parquet", b"PAR1")
    assert store.read_bytes("ledger/runs.parquet") == b"PAR1"
    assert uri == f"file://{tmp_path}/store/ledger/runs.parquet"
    with pytest.raises(StoreError, match="not found"):
        store.read_bytes("ledger/missing.parquet")


# ----- S3 through s3fs and moto


def s3_store(bucket, tmp_path, prefix: str = "runs") -> CheckpointStore:
    return CheckpointStore(
        f"{bucket.url}/{prefix}", storage_options=bucket.storage_options, cache_dir=tmp_path / "cache"
    )


def test_s3_publish_and_pull(s3_bucket, tmp_path):
    store = s3_store(s3_bucket, tmp_path)
    source = tmp_path / "merged"
    source.mkdir()
    write_checkpoint_files(source)

    ref = store.publish("s3key", source, RECIPE)
    cached = store.local_path(ref)

    listed = s3_bucket.client().list_objects_v2(Bucket=s3_bucket.name, Prefix="runs/checkpoints/s3key/")
    names = sorted(item["Key"] for item in listed["Contents"])
    assert not store.is_local
    assert ref.uri == f"s3://{s3_bucket.name}/runs/checkpoints/s3key/"
    assert ref.size_bytes == 1047
    assert names == [
        "runs/checkpoints/s3key/manifest.json",
        "runs/checkpoints/s3key/model.safetensors",
        "runs/checkpoints/s3key/tokenizer/config.json",
    ]
    assert store.keys() == ["s3key"]
    assert store.verify("s3key", deep=True)
    assert cached == tmp_path / "cache" / "s3key"
    assert (cached / "model.safetensors").read_bytes() == WEIGHTS
    assert (cached / "tokenizer" / "config.json").read_bytes() == CONFIG


def test_s3_cache_reused_then_repulled(s3_bucket, tmp_path):
    store = s3_store(s3_bucket, tmp_path)
    source = tmp_path / "merged"
    source.mkdir()
    write_checkpoint_files(source)
    store.publish("cached", source, RECIPE)

    weights = store.local_path("cached") / "model.safetensors"
    first_inode = weights.stat().st_ino
    again = store.local_path("cached") / "model.safetensors"
    reused_inode = again.stat().st_ino

    weights.write_bytes(b"truncated")
    repulled = store.local_path("cached") / "model.safetensors"

    assert reused_inode == first_inode
    assert repulled.read_bytes() == WEIGHTS


def test_s3_staging_becomes_cache(s3_bucket, tmp_path):
    store = s3_store(s3_bucket, tmp_path)
    with store.staging_dir("staged") as folder:
        assert folder.parent == tmp_path / "cache" / ".staging"
        write_checkpoint_files(folder)
        store.publish("staged", folder, RECIPE)

    cached = tmp_path / "cache" / "staged"
    inode = (cached / "model.safetensors").stat().st_ino
    assert store.local_path("staged") == cached
    assert (cached / "model.safetensors").stat().st_ino == inode
    assert list((tmp_path / "cache" / ".staging").iterdir()) == []


def test_s3_corrupt_object_rejected(s3_bucket, tmp_path):
    store = s3_store(s3_bucket, tmp_path)
    publish_sample(store, "bad")
    (tmp_path / "cache" / "bad" / "model.safetensors").unlink()
    s3_bucket.client().put_object(
        Bucket=s3_bucket.name, Key="runs/checkpoints/bad/model.safetensors", Body=b"\x00" * 1024
    )

    with pytest.raises(StoreError, match="the stored copy is corrupt"):
        store.local_path("bad")
    assert not (tmp_path / "cache" / "bad").exists()


def test_s3_files_without_manifest(s3_bucket, tmp_path):
    store = s3_store(s3_bucket, tmp_path)
    client = s3_bucket.client()
    client.put_object(Bucket=s3_bucket.name, Key="runs/checkpoints/partial/model.safetensors", Body=WEIGHTS)

    assert not store.exists("partial")
    assert store.keys() == []

    ref = publish_sample(store, "partial")
    assert store.get("partial") == ref


def test_s3_existing_key_kept(s3_bucket, tmp_path):
    store = s3_store(s3_bucket, tmp_path)
    first = publish_sample(store, "dup")
    other = s3_store(s3_bucket, tmp_path / "other")

    second = publish_sample(other, "dup", weights=b"\xff" * 1024)

    assert second == first
    assert other.verify("dup", deep=True)


def test_s3_retain_and_delete(s3_bucket, tmp_path):
    store = s3_store(s3_bucket, tmp_path)
    for key in ("x", "y"):
        publish_sample(store, key)

    assert store.retain({"x"}) == ["y"]
    listed = s3_bucket.client().list_objects_v2(Bucket=s3_bucket.name, Prefix="runs/checkpoints/y/")
    assert listed["KeyCount"] == 0
    assert store.keys() == ["x"]
    assert not (tmp_path / "cache" / "y").exists()


def test_s3_two_processes_race(s3_bucket, tmp_path):
    go = tmp_path / "go"
    options = json.dumps(s3_bucket.storage_options)
    children = [
        run_child(RACE_WRITER, f"{s3_bucket.url}/runs", str(go), options, str(tmp_path / f"cache{index}"))
        for index in range(2)
    ]
    time.sleep(1.0)
    go.touch()
    outputs = [child.communicate(timeout=60) for child in children]

    refs = [CheckpointRef.model_validate_json(stdout) for stdout, _ in outputs]
    winners = [stderr for _, stderr in outputs if "published checkpoint race to" in stderr]
    store = s3_store(s3_bucket, tmp_path)
    assert [child.returncode for child in children] == [0, 0]
    assert len(winners) == 1
    assert refs[0] == refs[1]
    assert refs[0] == store.get("race")
    assert store.keys() == ["race"]
    assert store.verify("race", deep=True)


def test_s3_environment_credentials(s3_bucket, tmp_path):
    store = CheckpointStore(f"{s3_bucket.url}/env", cache_dir=tmp_path / "cache")
    store.write_bytes("ledger/runs.parquet", b"PAR1")
    assert store.read_bytes("ledger/runs.parquet") == b"PAR1"


def test_s3_missing_bucket_named(s3_bucket, tmp_path):
    options = s3_bucket.storage_options
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' of store"):
        CheckpointStore("s3://no-such-bucket/x", storage_options=options, cache_dir=tmp_path)


def test_s3_unreachable_endpoint_transient(tmp_path, monkeypatch):
    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    options = {
        "endpoint_url": f"http://127.0.0.1:{free_port()}",
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
    }
    with pytest.raises(TransientStoreError):
        CheckpointStore("s3://evomerge-unreachable/x", storage_options=options, cache_dir=tmp_path)
