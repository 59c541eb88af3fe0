"""Scale-out: Dask and Ray task runners, one store shared by processes, one GPU per worker."""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.config import RunnerSettings, StorageSettings
from evomerge.exceptions import ConfigError
from s3_server import s3_bucket, s3_server  # noqa: F401

# Seconds between submitting the two concurrent builds and their common start time.
# Both pool processes pick up their job well within it.
START_DELAY_SECONDS = 1.5


# ----- runner selection


def test_overrides_set_runner_and_address(tiny_config):
    from flows.runners import apply_runner_overrides

    updated = apply_runner_overrides(tiny_config, "dask", "tcp://127.0.0.1:8786")

    assert updated.runner.task_runner == "dask"
    assert updated.runner.address == "tcp://127.0.0.1:8786"
    assert tiny_config.runner.task_runner == "thread"


def test_overrides_reject_address_on_threads(tiny_config):
    from flows.runners import apply_runner_overrides

    with pytest.raises(ConfigError, match="--task-runner dask"):
        apply_runner_overrides(tiny_config, None, "tcp://127.0.0.1:8786")


def test_overrides_reject_unknown_runner(tiny_config):
    from flows.runners import apply_runner_overrides

    with pytest.raises(ConfigError, match="'spark'"):
        apply_runner_overrides(tiny_config, "spark", None)


def test_cli_runner_flags_set_config(tiny_config, tmp_path):
    from evomerge.cli import build_parser, load_run_config
    from evomerge.config import save_config

    path = save_config(tiny_config, tmp_path / "run.yaml")
    args = build_parser().parse_args(["--run", "--config", str(path), "--task-runner", "dask", "--address", "tcp://127.0.0.1:8786"])

    config = load_run_config(args)

    assert config.runner.task_runner == "dask"
    assert config.runner.address == "tcp://127.0.0.1:8786"


def test_cli_runner_flags_need_run():
    from evomerge.cli import UsageError, build_parser, chosen_action

    args = build_parser().parse_args(["--report", "run-1", "--task-runner", "dask"])

    with pytest.raises(UsageError, match="--task-runner and --address only go with --run"):
        chosen_action(args)


def test_dask_local_cluster_on_loopback():
    from flows.runners import make_distributed_task_runner

    runner = make_distributed_task_runner(RunnerSettings(task_runner="dask", max_workers=3))

    assert runner.cluster_kwargs["n_workers"] == 3
    assert runner.cluster_kwargs["threads_per_worker"] == 1
    assert runner.cluster_kwargs["processes"] is True
    assert runner.cluster_kwargs["host"] == "127.0.0.1"


def test_dask_address_connects_to_scheduler():
    from flows.runners import make_distributed_task_runner

    runner = make_distributed_task_runner(RunnerSettings(task_runner="dask", address="tcp://10.0.0.5:8786"))

    assert runner.address == "tcp://10.0.0.5:8786"
    assert runner.cluster_kwargs == {}


def test_dask_gpus_without_cuda_rejected(monkeypatch):
    from flows.runners import make_distributed_task_runner

    monkeypatch.setenv("EVOMERGE_FAKE_CUDA_DEVICES", "0")

    with pytest.raises(ConfigError, match="no CUDA device"):
        make_distributed_task_runner(RunnerSettings(task_runner="dask", gpus_per_task=1))


def test_dask_two_gpus_per_task_rejected(monkeypatch):
    from flows.runners import make_distributed_task_runner

    monkeypatch.setenv("EVOMERGE_FAKE_CUDA_DEVICES", "2")

    with pytest.raises(ConfigError, match="gpus_per_task is 2.0"):
        make_distributed_task_runner(RunnerSettings(task_runner="dask", gpus_per_task=2))


def test_gpu_cluster_fits_half_gpu_tasks():
    from flows.runners import gpu_cluster_spec

    spec = gpu_cluster_spec(["0", "1"], 0.5)
    options = spec["workers"]["gpu-1"]["options"]

    assert sorted(spec["workers"]) == ["gpu-0", "gpu-1"]
    assert options["nthreads"] == 2
    assert options["env"] == {"CUDA_VISIBLE_DEVICES": "1"}
    assert spec["scheduler"]["options"]["host"] == "127.0.0.1"


def test_gpu_request_annotates_dask_resources():
    import dask

    from flows.runners import gpu_request

    with gpu_request(RunnerSettings(task_runner="dask", gpus_per_task=0.5)):
        inside = dask.get_annotations()

    assert inside == {"resources": {"GPU": 0.5}}
    assert dask.get_annotations() == {}


def test_gpu_request_empty_without_gpus():
    import dask

    from flows.runners import gpu_request

    with gpu_request(RunnerSettings(task_runner="dask", gpus_per_task=0)):
        inside = dask.get_annotations()

    assert inside == {}


# ----- devices


def test_concurrent_leases_get_distinct_gpus(monkeypatch):
    from evomerge.device_pool import lease_device

    monkeypatch.setenv("EVOMERGE_FAKE_CUDA_DEVICES", "2")

    with lease_device() as first, lease_device() as second:
        with lease_device() as third:
            pass

    assert first == "cuda:0"
    assert second == "cuda:1"
    assert third == "cuda:0"


def test_gpu_cluster_pins_gpu_per_worker(monkeypatch):
    import dask
    from distributed import Client, SpecCluster

    from flows.runners import gpu_request, make_distributed_task_runner

    monkeypatch.setenv("EVOMERGE_FAKE_CUDA_DEVICES", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    settings = RunnerSettings(task_runner="dask", gpus_per_task=1)
    runner = make_distributed_task_runner(settings)

    assert runner.cluster_class == "distributed.SpecCluster"
    with SpecCluster(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        visible = client.run(os.getenv, "CUDA_VISIBLE_DEVICES")
        resources = {info["name"]: info["resources"] for info in client.scheduler_info()["workers"].values()}
        with gpu_request(settings):
            futures = [client.submit(os.getenv, "CUDA_VISIBLE_DEVICES", pure=False) for _ in range(4)]
        results = client.gather(futures)
        annotated = dask.get_annotations()

    assert sorted(visible.values()) == ["0", "1"]
    assert resources == {"gpu-0": {"GPU": 1}, "gpu-1": {"GPU": 1}}
    assert set(results) <= {"0", "1"}
    assert annotated == {}


def test_gpu_cluster_keeps_visible_device_ids(monkeypatch):
    from flows.runners import visible_gpu_ids

    monkeypatch.setenv("EVOMERGE_FAKE_CUDA_DEVICES", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")

    assert visible_gpu_ids() == ["3", "5"]


# ----- one store, two writers


def build_at(job_json: dict, start_at: float) -> tuple[dict, int]:
    """Build the job at ``start_at`` (a ``time.time()`` value), in a pool process."""
    from evomerge.jobs import BuildJob, build_candidate, import_model_libraries

    import_model_libraries()
    job = BuildJob.model_validate(job_json)
    time.sleep(max(0.0, start_at - time.time()))
    return build_candidate(job).model_dump(mode="json"), os.getpid()


@pytest.fixture(scope="module")
def process_pool():
    """Two spawned processes with the model libraries already imported."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        yield pool


def _linear_job(family: list[Path], storage: StorageSettings):
    from evomerge.jobs import BuildJob

    recipe = {
        "method": "linear",
        "inputs": ["model:ft1", "model:ft2"],
        "input_parameters": [{"weight": 0.5}, {"weight": 0.5}],
    }
    return BuildJob(
        key="linear-ft1-ft2-half",
        recipe=recipe,
        model_paths={"model:ft1": str(family[1]), "model:ft2": str(family[2])},
        storage=storage,
    )


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_concurrent_builds_share_checkpoint(backend, process_pool, tiny_family, tmp_path, request):
    from evomerge.jobs import BuildResult, open_store

    if backend == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        shared = {"store_url": f"{bucket.url}/prefix", "storage_options": bucket.storage_options}
        # Separate caches stand for two hosts that share only the bucket.
        storages = [StorageSettings(state_dir=str(tmp_path / f"host{i}"), **shared) for i in range(2)]
    else:
        storages = [StorageSettings(state_dir=str(tmp_path / "state"))] * 2
    jobs = [_linear_job(tiny_family, storage) for storage in storages]

    start_at = time.time() + START_DELAY_SECONDS
    futures = [process_pool.submit(build_at, job.model_dump(mode="json"), start_at) for job in jobs]
    outputs = [future.result(timeout=120) for future in futures]
    results = [BuildResult.model_validate(data) for data, _ in outputs]
    store = open_store(storages[0])
    merged = load_file(store.local_path(jobs[0].key) / "model.safetensors")
    first = load_file(tiny_family[1] / "model.safetensors")
    second = load_file(tiny_family[2] / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"

    assert outputs[0][1] != outputs[1][1]
    assert results[0].failed is False
    assert results[1].failed is False
    assert results[0].ref == results[1].ref
    assert sum(result.reused for result in results) <= 1
    assert store.keys() == [jobs[0].key]
    assert store.verify(jobs[0].key, deep=True)
    assert torch.allclose(merged[name], (first[name] + second[name]) / 2, atol=1e-6)
    if backend == "local":
        assert list((Path(store.root) / ".staging").iterdir()) == []


# ----- whole tournament on Dask and S3


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    from evomerge.defaults import create_tiny_config

    return create_tiny_config(tmp_path_factory.mktemp("scaleout"), generations=2, population_size=4)


def _run_isolated(config, run_id: str, results_dir: Path) -> dict:
    """Run the flow with its own Prefect result storage, so no cached task result from another run is used."""
    from prefect.settings import temporary_settings

    from flows.tournament import run_flow

    with temporary_settings(updates={"results.local_storage_path": str(results_dir)}):
        return run_flow(config, run_id=run_id)


def _read_merge_results(results_dir: Path) -> list:
    """Read every persisted merge-task result under ``results_dir`` back in this (the flow's) process."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    store = ResultStore(result_storage=LocalFileSystem(basepath=str(results_dir)))
    names = sorted(path.name for path in results_dir.glob("evomerge-merge-*"))
    return [store.read(name).result for name in names]


@pytest.mark.slow
def test_dask_s3_matches_thread_runner(prefect_harness, tiny_config, s3_bucket, tmp_path):
    from evomerge.jobs import BuildResult

    thread_config = tiny_config.model_copy(
        update={"storage": StorageSettings(state_dir=str(tmp_path / "thread"))}
    )
    dask_storage = StorageSettings(
        state_dir=str(tmp_path / "dask"),
        store_url=f"{s3_bucket.url}/prefix",
        storage_options=s3_bucket.storage_options,
    )
    dask_config = tiny_config.model_copy(
        update={"storage": dask_storage, "runner": RunnerSettings(task_runner="dask", max_workers=2)}
    )

    thread_summary = _run_isolated(thread_config, "scaleout-thread", tmp_path / "thread-results")
    dask_summary = _run_isolated(dask_config, "scaleout-dask", tmp_path / "dask-results")
    merge_results = _read_merge_results(tmp_path / "dask-results")
    built = [result for result in merge_results if isinstance(result, BuildResult) and not result.failed]

    assert dask_summary["best_key"] == thread_summary["best_key"]
    assert dask_summary["best_fitness"] == pytest.approx(thread_summary["best_fitness"], rel=1e-5)
    assert len(built) >= 4
    assert all(result.ref.uri.startswith(f"{s3_bucket.url}/prefix/checkpoints/") for result in built)


@pytest.mark.slow
def test_ray_matches_thread_runner(prefect_harness, tiny_config, tmp_path):
    pytest.importorskip("prefect_ray", reason="the Ray runner needs prefect-ray: pip install 'evomerge[ray]'")

    thread_config = tiny_config.model_copy(
        update={"storage": StorageSettings(state_dir=str(tmp_path / "thread"))}
    )
    ray_config = tiny_config.model_copy(
        update={
            "storage": StorageSettings(state_dir=str(tmp_path / "ray")),
            "runner": RunnerSettings(task_runner="ray", max_workers=2),
        }
    )

    thread_summary = _run_isolated(thread_config, "scaleout-ray-thread", tmp_path / "thread-results")
    ray_summary = _run_isolated(ray_config, "scaleout-ray", tmp_path / "ray-results")

    assert ray_summary["best_key"] == thread_summary["best_key"]


def test_runner_match_needs_same_kind():
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.runners import make_distributed_task_runner, task_runner_matches

    dask_settings = RunnerSettings(task_runner="dask", max_workers=2)

    assert task_runner_matches(ThreadPoolTaskRunner(max_workers=2), RunnerSettings(max_workers=2))
    assert not task_runner_matches(ThreadPoolTaskRunner(max_workers=2), RunnerSettings(max_workers=3))
    assert not task_runner_matches(ThreadPoolTaskRunner(max_workers=2), dask_settings)
    assert task_runner_matches(make_distributed_task_runner(dask_settings), dask_settings)



# ----- benchmark report


def test_benchmark_table_speedup_and_concurrency():
    from evomerge.scaleout_benchmark import ScaleoutResult, WorkerRun, markdown_section

    result = ScaleoutResult(models=4, hidden_size=512, repeats=3, cpu_count=2, load_average=(1.0, 1.0, 1.0))
    result.runs.append(WorkerRun(workers=1, wall_seconds=8.0, evaluation_seconds=[2.0] * 4, fitness=[-5.0] * 4))
    result.runs.append(WorkerRun(workers=2, wall_seconds=5.0, evaluation_seconds=[2.5] * 4, fitness=[-5.0] * 4))

    table = markdown_section(result, "python -m evomerge.scaleout_benchmark")

    assert result.speedups() == {1: 1.0, 2: 1.6}
    assert result.runs[1].concurrency() == 2.0
    assert "| 1 | 8.00 | 2.00 | 1.00 | 1.00x |" in table
    assert "| 2 | 5.00 | 2.50 | 2.00 | 1.60x |" in table


def test_benchmark_rejects_zero_workers(tmp_path):
    from evomerge.scaleout_benchmark import run_scaleout_benchmark

    with pytest.raises(ConfigError, match=r"worker counts \[0, 2\]"):
        run_scaleout_benchmark(tmp_path, worker_counts=(0, 2))
