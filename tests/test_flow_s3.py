"""The tournament flow with its checkpoint store on S3 (s3fs against a moto server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json

import pytest

from evomerge.config import StorageSettings
from evomerge.defaults import create_tiny_config


@pytest.fixture
def s3_config(s3_bucket, tmp_path):
    config = create_tiny_config(tmp_path / "tiny", generations=1, population_size=2)
    storage = StorageSettings(
        state_dir=str(tmp_path / "state"),
        store_url=f"{s3_bucket.url}/evomerge",
        storage_options=s3_bucket.storage_options,
    )
    return config.model_copy(update={"storage": storage})


async def _latest_merge_run_count(key: str) -> int:
    """Return the run count of the newest merge task run of candidate ``key``.

    Other tests in the session build the same tiny candidates, so older task
    runs of that name exist too.
    """
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        task_runs = await client.read_task_runs()
    runs = [run for run in task_runs if run.name == f"merge-{key}"]
    return max(runs, key=lambda run: run.created).run_count


def test_flow_on_s3_retries_transient_error(prefect_harness, s3_config, s3_bucket, monkeypatch):
    import s3fs

    from flows.tournament import run_flow

    # The first upload of a checkpoint file fails as a dropped connection
    # would; the merge task must retry and publish on its next attempt.
    original_put_file = s3fs.S3FileSystem._put_file
    failures: list[str] = []

    async def flaky_put_file(self, lpath, rpath, *args, **kwargs):
        if not failures:
            failures.append(rpath)
            raise ConnectionError(f"connection reset while uploading {rpath}")
        return await original_put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", flaky_put_file)

    summary = run_flow(s3_config, run_id="s3-run")

    assert len(failures) == 1
    failed_key = failures[0].split("/checkpoints/", 1)[1].split("/", 1)[0]
    assert asyncio.run(_latest_merge_run_count(failed_key)) == 2
    assert summary["best_key"] is not None
    listed = s3_bucket.client().list_objects_v2(Bucket=s3_bucket.name, Prefix=f"evomerge/checkpoints/{summary['best_key']}/")
    names = {item["Key"].rsplit("/", 1)[-1] for item in listed.get("Contents", [])}
    assert "manifest.json" in names
    assert "model.safetensors" in names
    manifest = s3_bucket.client().get_object(Bucket=s3_bucket.name, Key=f"evomerge/checkpoints/{summary['best_key']}/manifest.json")
    assert json.loads(manifest["Body"].read())["key"] == summary["best_key"]
