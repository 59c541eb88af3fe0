"""Benchmarks of the merge engine and of evaluation, recorded in docs/benchmarks.md.

Run ``python -m evomerge.benchmarks SUBCOMMAND`` with one of:

* ``merge``: every parameter-space method on three random models of SmolLM2-135M's
  shapes, against the I/O floor (plain file copies of the same bytes) and against
  mergekit when it is installed;
* ``evaluate``: perplexity throughput against a plain transformers forward loop, and
  several candidates evaluated one by one against ``parallel_evaluate_models``;
* ``gpu``: CUDA against CPU for one merge and one perplexity run, or the record that
  no CUDA device exists.

Each subcommand prints a table and replaces its own section of the record file. Every
time is reported with a ratio to a baseline measured in the same run, because the
machines these run on are shared and absolute times vary between runs.

Models are random weights with the right tensor shapes, built once into a cache folder
and reused. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Named explicitly because ``python -m`` runs this module as ``__main__``, outside the evomerge logger.
logger = logging.getLogger("evomerge.benchmarks")

DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "evomerge-bench"
DEFAULT_DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
DEFAULT_MERGEKIT = Path("/tmp/mergekit-venv/bin/mergekit-yaml")
MERGEKIT_VERSION = "0.1.5"

PARAMETER_METHODS = (
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "breadcrumbs",
    "della",
    "model_stock",
)
MERGEKIT_METHODS = ("linear", "ties")
SCALING_METHODS = ("linear",)

# Targets of the merge benchmark; docs/benchmarks.md reports each as met or not.
LINEAR_MAX_FLOOR_RATIO = 3.0
TIES_MIN_SPEEDUP = 5.0
# "Peak RSS does not grow with depth": the deeper model may add at most this fraction.
MAX_RSS_GROWTH = 0.10
EVALUATE_MIN_RATIO = 0.9

# Standard deviation of the random weights and of the fine-tune noise added to the base.
WEIGHT_STD = 0.02
FINE_TUNE_NOISE = 0.01

READ_CHUNK_BYTES = 16 * 1024 * 1024
MIB = 1024 * 1024


# ---------------------------------------------------------------------------
# Model shapes and the model cache
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The tensor shapes of a Llama model: sizes, depth, heads and vocabulary."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = True

    def with_layers(self, num_layers: int) -> "ModelShape":
        """Return the same shape with ``num_layers`` decoder layers."""
        return ModelShape(
            self.hidden_size,
            self.intermediate_size,
            num_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.vocab_size,
            self.tie_word_embeddings,
        )

    @property
    def tag(self) -> str:
        """A folder name that identifies the shape."""
        tied = "tied" if self.tie_word_embeddings else "untied"
        return (
            f"h{self.hidden_size}-i{self.intermediate_size}-l{self.num_layers}-a{self.num_attention_heads}"
            f"-kv{self.num_key_value_heads}-v{self.vocab_size}-{tied}"
        )


# The shapes of HuggingFaceTB/SmolLM2-135M: 576 hidden, 1536 intermediate, 30 layers,
# 9 heads, 3 key-value heads, 49152 tokens, tied embeddings. Its weights take 538 MB in float32.
SMOLLM2_135M = ModelShape(576, 1536, 30, 9, 3, 49152, True)
# Shapes for a smoke run that finishes in seconds.
QUICK_SHAPE = ModelShape(64, 128, 4, 4, 2, 1024, True)


def llama_config(shape: ModelShape):
    """Return a float32 ``LlamaConfig`` with the tensor shapes of ``shape``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        dtype="float32",
        # save_pretrained fills this in, but the writer takes the config as given, and mergekit needs it.
        architectures=["LlamaForCausalLM"],
    )


def tensor_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Return the stored tensor names and shapes of a ``LlamaForCausalLM`` of ``shape``.

    The model is built on the meta device, so no memory is allocated. A tied
    ``lm_head.weight`` is left out, as ``save_pretrained`` leaves it out.
    """
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape))
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if shape.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def random_state_dict(shape: ModelShape, seed: int) -> dict[str, torch.Tensor]:
    """Return random float32 weights: norms at 1, every other tensor Gaussian with std WEIGHT_STD."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, dims in tensor_shapes(shape).items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(dims)
        else:
            state[name] = torch.randn(dims, generator=generator) * WEIGHT_STD
    return state


def build_family(cache_dir: Path, shape: ModelShape, fine_tunes: int = 2) -> list[Path]:
    """Build, or reuse from ``cache_dir``, a random base model and ``fine_tunes`` noisy copies.

    Returns ``[base, ft1, ft2, ...]``. Each fine-tune is the base plus Gaussian noise of
    std FINE_TUNE_NOISE, so task vectors are dense and of one scale. Every folder gets the
    tokenizer of ``evomerge.testing.build_tiny_tokenizer`` so that evaluation can load it.
    Folders are published atomically by ``CheckpointWriter``, so an existing folder is complete.
    """
    from evomerge.checkpoint import save_state_dict
    from evomerge.testing import build_tiny_tokenizer

    family_dir = cache_dir / shape.tag
    paths = [family_dir / "base"] + [family_dir / f"ft{index}" for index in range(1, fine_tunes + 1)]
    if all(path.is_dir() for path in paths):
        return paths

    family_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = family_dir / "tokenizer"
    if not tokenizer_dir.is_dir():
        build_tiny_tokenizer().save_pretrained(tokenizer_dir)
    config = llama_config(shape).to_dict()

    started = time.perf_counter()
    base_state = random_state_dict(shape, seed=0)
    if not paths[0].is_dir():
        save_state_dict(base_state, paths[0], config=config, side_files_from=tokenizer_dir)
    for index, path in enumerate(paths[1:], start=1):
        if path.is_dir():
            continue
        generator = torch.Generator().manual_seed(index)
        state = {
            name: tensor + torch.randn(tensor.shape, generator=generator) * FINE_TUNE_NOISE
            for name, tensor in base_state.items()
        }
        save_state_dict(state, path, config=config, side_files_from=tokenizer_dir)
        del state
    logger.info("Built %d models of shape %s in %.1f s", len(paths), shape.tag, time.perf_counter() - started)
    return paths


def folder_bytes(path: Path) -> int:
    """Return the total size of the safetensors files in a model folder."""
    return sum(file.stat().st_size for file in path.glob("*.safetensors"))


# ---------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------


@dataclass
class ChildRun:
    """A finished child process: exit code, wall time, memory peaks and its last output line.

    ``peak_rss_bytes`` is ``ru_maxrss``, which counts file pages mapped with mmap, such as
    safetensors inputs, as they are touched. ``peak_anon_bytes`` is the largest ``RssAnon``
    seen in /proc every 20 ms: heap and tensors only, and a sample, so a shorter spike can be missed.
    """

    returncode: int
    seconds: float
    peak_rss_bytes: int
    peak_anon_bytes: int
    last_line: str
    stderr_tail: str


# Forks the measured command from a small Python process, samples its anonymous memory
# every 20 ms and writes "ru_maxrss_kib peak_rss_anon_kib". On Linux a child's ru_maxrss
# starts at the RSS of the process that forked it and survives exec, so forking straight
# from this torch-laden process would report at least this process's RSS.
_LAUNCHER_CODE = """
import os, sys, time
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
peak_anon = 0
while True:
    finished, status, usage = os.wait4(pid, os.WNOHANG)
    if finished:
        break
    try:
        with open(f"/proc/{pid}/status") as status_file:
            for line in status_file:
                if line.startswith("RssAnon:"):
                    peak_anon = max(peak_anon, int(line.split()[1]))
    except OSError:
        pass
    time.sleep(0.02)
with open(sys.argv[1], "w") as handle:
    handle.write(f"{usage.ru_maxrss} {peak_anon}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(argv: list[str], env: dict[str, str] | None = None) -> ChildRun:
    """Run ``argv`` to completion and return its wall time and memory peaks.

    A small launcher process forks the command and reads its ``ru_maxrss`` with
    ``os.wait4``, so each measurement covers one command and starts from the launcher's
    few MiB. Output goes to temporary files so a chatty child cannot fill a pipe and block.
    NOTE: there is no timeout, so a command that hangs stops the benchmark.
    """
    with (
        tempfile.TemporaryFile(mode="w+") as stdout,
        tempfile.TemporaryFile(mode="w+") as stderr,
        tempfile.NamedTemporaryFile(mode="r", suffix=".rss") as rss_file,
    ):
        started = time.perf_counter()
        completed = subprocess.run(
            [sys.executable, "-c", _LAUNCHER_CODE, rss_file.name, *argv], stdout=stdout, stderr=stderr, env=env
        )
        seconds = time.perf_counter() - started

        stdout.seek(0)
        lines = [line for line in stdout.read().splitlines() if line.strip()]
        stderr.seek(0)
        stderr_tail = stderr.read()[-2000:]
        memory_fields = rss_file.read().split()
    # Both figures are in kibibytes; a launcher that failed early wrote nothing.
    peak_rss_bytes, peak_anon_bytes = (int(value) * 1024 for value in memory_fields) if memory_fields else (0, 0)
    return ChildRun(
        completed.returncode, seconds, peak_rss_bytes, peak_anon_bytes, lines[-1] if lines else "", stderr_tail
    )


def drop_page_cache(enabled: bool) -> bool:
    """Write back dirty pages and empty the page cache; return False when that is not permitted."""
    if not enabled:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as handle:
            handle.write("3\n")
    except OSError as error:
        logger.info("Cannot drop the page cache (%s): measuring with a warm cache", error)
        return False
    return True


def can_drop_page_cache() -> bool:
    """Return whether this process may write /proc/sys/vm/drop_caches."""
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def measure_io_floor(inputs: list[Path], output_dir: Path) -> float:
    """Return the seconds to read every input's weights and write one model's weights.

    The first input's safetensors files are copied with ``shutil.copyfile`` and fsynced,
    as the checkpoint writer fsyncs its shards. The other inputs are read in 16 MiB
    chunks and discarded. This is the least work any merge of these inputs must do.
    """
    output_dir.mkdir(parents=True)
    started = time.perf_counter()
    for source in sorted(inputs[0].glob("*.safetensors")):
        target = output_dir / source.name
        shutil.copyfile(source, target)
        with open(target, "rb+") as handle:
            os.fsync(handle.fileno())
    for model in inputs[1:]:
        for source in sorted(model.glob("*.safetensors")):
            with open(source, "rb") as handle:
                while handle.read(READ_CHUNK_BYTES):
                    pass
    return time.perf_counter() - started


def describe_machine(load_at_start: tuple[float, float, float] | None = None) -> dict[str, str]:
    """Return the CPU model, core count, RAM, torch version, GPU and the load averages at start and now."""
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
                break
    except OSError:
        pass

    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count()))
    else:
        gpu = "none (torch.cuda.is_available() is False)"

    description = {
        "CPU": cpu_model,
        "cores": str(os.cpu_count()),
        "RAM": memory,
        "torch": torch.__version__,
        "Python": platform.python_version(),
        "GPU": gpu,
    }
    if load_at_start is not None:
        description["load average (1, 5, 15 min) at the start"] = ", ".join(f"{value:.2f}" for value in load_at_start)
    description["load average (1, 5, 15 min) at the end"] = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return description


# ---------------------------------------------------------------------------
# Tables and the record file
# ---------------------------------------------------------------------------


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """Format a GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def section_markers(name: str) -> tuple[str, str]:
    """Return the HTML comments that enclose the generated section ``name``."""
    return f"<!-- benchmark:{name} start -->", f"<!-- benchmark:{name} end -->"


def update_record(doc_path: Path, name: str, body: str) -> None:
    """Replace the section ``name`` of the record file with ``body``, or append it.

    Only the text between the section's markers changes, so hand-written text and
    the other sections stay as they are.
    """
    start, end = section_markers(name)
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = doc_path.read_text(encoding="utf-8") if doc_path.is_file() else "# Benchmarks\n"
    if start in text and end in text:
        before = text.split(start, 1)[0]
        after = text.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(text, encoding="utf-8")
    logger.info("Updated section %r of %s", name, doc_path)


def record_header(title: str, args: argparse.Namespace, notes: list[str]) -> str:
    """Return the start of a record section: title, command, date, machine and notes."""
    command = invoked_command(args.argv)
    machine = describe_machine(getattr(args, "load_at_start", None))
    lines = [
        f"## {title}",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        "Machine:",
        "",
    ]
    lines.extend(f"- {key}: {value}" for key, value in machine.items())
    lines.append("")
    lines.extend(notes)
    return "\n".join(lines)


def format_ratio(value: float | None) -> str:
    """Format a ratio as ``1.23x``, or a dash when it is unknown."""
    return "-" if value is None else f"{value:.2f}x"


def target_verdict(met: bool | None) -> str:
    """Return 'met', 'not met' or 'not measured'."""
    if met is None:
        return "not measured"
    return "met" if met else "not met"


def invoked_command(argv: list[str]) -> str:
    """Return the benchmark command line for ``argv`` in a form that can be pasted into a shell."""
    return " ".join(["python -m evomerge.benchmarks", *(shlex.quote(argument) for argument in argv)])


# ---------------------------------------------------------------------------
# The merge benchmark
# ---------------------------------------------------------------------------


def merge_spec(method: str, base: Path, fine_tunes: list[Path]) -> dict[str, Any]:
    """Return the mergekit-shaped spec used for ``method`` on these models.

    linear averages all three models, so it reads as much as the I/O floor. slerp
    interpolates the base and the first fine-tune halfway. The task-vector methods
    give each fine-tune weight 0.5 over the base.
    """
    models = [str(path) for path in fine_tunes]
    spec: dict[str, Any] = {"merge_method": method, "dtype": "float32"}
    if method == "linear":
        spec["models"] = [{"model": path, "parameters": {"weight": 1.0}} for path in [str(base), *models]]
        return spec

    spec["base_model"] = str(base)
    if method == "slerp":
        spec["models"] = [{"model": str(base)}, {"model": models[0]}]
        spec["parameters"] = {"t": 0.5}
        return spec
    if method == "model_stock":
        spec["models"] = [{"model": path} for path in models]
        return spec

    per_model: dict[str, Any] = {"weight": 0.5}
    if method in ("ties", "dare_ties", "della"):
        per_model["density"] = 0.5
    if method == "breadcrumbs":
        per_model.update({"density": 0.9, "gamma": 0.01})
    if method == "della":
        per_model["epsilon"] = 0.15
    spec["models"] = [{"model": path, "parameters": dict(per_model)} for path in models]
    return spec


_CHILD_CODE = "import sys; from evomerge.benchmarks import child_main; child_main(sys.argv[1])"


def child_main(payload: str) -> None:
    """Run one measured task in a child process and write its result as one JSON line.

    ``payload`` is JSON with ``task``: ``"import"`` only imports the merge engine, the
    RSS floor of any merge child. ``"merge"`` runs ``run_merge`` on ``spec`` into
    ``output`` with ``max_shard_bytes`` and ``device`` and reports the time of that call.
    """
    request = json.loads(payload)
    from evomerge.merge.engine import MergeOptions, run_merge
    from evomerge.merge.spec import spec_from_dict

    result: dict[str, Any] = {"task": request["task"]}
    if request["task"] == "merge":
        defaults = MergeOptions()
        options = MergeOptions(
            max_shard_bytes=request.get("max_shard_bytes") or defaults.max_shard_bytes,
            device=request.get("device", "cpu"),
        )
        started = time.perf_counter()
        run_merge(spec_from_dict(request["spec"]), request["output"], options)
        result["merge_seconds"] = time.perf_counter() - started
    sys.stdout.write(json.dumps(result) + "\n")


@dataclass
class MergeRun:
    """One measured merge: the call's time, the whole process's time and its peak RSS."""

    label: str
    merge_seconds: float | None
    process_seconds: float
    peak_rss_bytes: int
    peak_anon_bytes: int
    error: str | None = None


def run_evomerge_child(
    spec: dict[str, Any], output: Path, *, max_shard_bytes: int | None, device: str = "cpu", label: str = ""
) -> MergeRun:
    """Merge ``spec`` into ``output`` in a fresh Python process and measure it."""
    payload = json.dumps(
        {"task": "merge", "spec": spec, "output": str(output), "max_shard_bytes": max_shard_bytes, "device": device}
    )
    child = run_child([sys.executable, "-c", _CHILD_CODE, payload])
    if child.returncode != 0:
        error = _last_error_line(child.stderr_tail)
        return MergeRun(label, None, child.seconds, child.peak_rss_bytes, child.peak_anon_bytes, error=error)
    result = json.loads(child.last_line)
    return MergeRun(label, result["merge_seconds"], child.seconds, child.peak_rss_bytes, child.peak_anon_bytes)


def run_import_child() -> ChildRun:
    """Measure a child process that only imports the merge engine."""
    return run_child([sys.executable, "-c", _CHILD_CODE, json.dumps({"task": "import"})])


def run_mergekit(executable: Path, spec: dict[str, Any], output: Path, work_dir: Path, label: str) -> MergeRun:
    """Run ``mergekit-yaml`` on ``spec`` into ``output`` and measure the whole process.

    Flags: ``--lazy-unpickle`` as mergekit recommends for low memory, and no tokenizer
    copy, model card or progress bars, which EvoMerge's timing does not include either.
    """
    import yaml

    config_path = work_dir / f"mergekit-{label}.yml"
    config_path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    argv = [
        str(executable),
        str(config_path),
        str(output),
        "--lazy-unpickle",
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--quiet",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    child = run_child(argv, env=env)
    if child.returncode != 0:
        error = _last_error_line(child.stderr_tail)
        return MergeRun(label, None, child.seconds, child.peak_rss_bytes, child.peak_anon_bytes, error=error)
    return MergeRun(label, None, child.seconds, child.peak_rss_bytes, child.peak_anon_bytes)


def _last_error_line(stderr: str) -> str:
    """Return the last non-empty line of a child's stderr, which is usually the exception."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def find_mergekit(argument: str | None) -> tuple[Path | None, str]:
    """Return the mergekit-yaml executable to use, or None and the reason it is skipped."""
    if argument == "none":
        return None, "skipped: --mergekit none"
    path = Path(argument) if argument else DEFAULT_MERGEKIT
    if not path.is_file():
        return None, (
            f"skipped: {path} not found; install it with `python -m venv /tmp/mergekit-venv && "
            f"/tmp/mergekit-venv/bin/pip install torch==2.13.0 mergekit=={MERGEKIT_VERSION}` or pass --mergekit PATH"
        )
    return path, f"{path}"


def _fresh(path: Path) -> Path:
    """Remove ``path`` if it exists and return it."""
    if path.exists():
        shutil.rmtree(path)
    return path


@dataclass
class MergeBenchmark:
    """The results of one ``merge`` run, ready to print and record."""

    shape: ModelShape
    model_bytes: int
    floor_seconds: float
    floor_samples: list[float]
    import_rss_bytes: int
    cold_cache: bool
    mergekit_note: str
    evomerge: dict[str, MergeRun] = field(default_factory=dict)
    mergekit: dict[str, MergeRun] = field(default_factory=dict)
    scaling: list[tuple[int, str, MergeRun]] = field(default_factory=list)


def benchmark_merge(args: argparse.Namespace) -> MergeBenchmark:
    """Measure the I/O floor, every requested EvoMerge method, mergekit and the depth scaling."""
    base_shape = QUICK_SHAPE if args.quick else SMOLLM2_135M
    shape = base_shape.with_layers(args.layers) if args.layers else base_shape
    cache_dir = Path(args.cache)
    work_dir = cache_dir / "work"
    work_dir.mkdir(parents=True, exist_ok=True)
    cold = args.drop_caches and can_drop_page_cache()

    base, *fine_tunes = build_family(cache_dir, shape)
    mergekit, mergekit_note = find_mergekit(args.mergekit)

    def floor() -> float:
        drop_page_cache(cold)
        seconds = measure_io_floor([base, *fine_tunes], _fresh(work_dir / "floor"))
        shutil.rmtree(work_dir / "floor")
        return seconds

    floor_seconds = floor()
    result = MergeBenchmark(
        shape=shape,
        model_bytes=folder_bytes(base),
        floor_seconds=floor_seconds,
        floor_samples=[floor_seconds],
        import_rss_bytes=run_import_child().peak_rss_bytes,
        cold_cache=cold,
        mergekit_note=mergekit_note,
    )
    logger.info("I/O floor: %.2f s for %d models of %d bytes", floor_seconds, 3, result.model_bytes)

    for method in args.methods:
        spec = merge_spec(method, base, fine_tunes)
        output = _fresh(work_dir / f"evomerge-{method}")
        drop_page_cache(cold)
        run = run_evomerge_child(spec, output, max_shard_bytes=args.max_shard_bytes, label=method)
        result.evomerge[method] = run
        logger.info("EvoMerge %s: %s s, peak RSS %d MiB", method, run.merge_seconds, run.peak_rss_bytes // MIB)
        _fresh(output)

        if mergekit is not None and method in MERGEKIT_METHODS:
            output = _fresh(work_dir / f"mergekit-{method}")
            drop_page_cache(cold)
            run = run_mergekit(mergekit, spec, output, work_dir, method)
            result.mergekit[method] = run
            logger.info("mergekit %s: %.2f s, peak RSS %d MiB", method, run.process_seconds, run.peak_rss_bytes // MIB)
            _fresh(output)

    # The floor is measured again after the merges, and the lower value counts, because the
    # load of a shared machine changes during the run.
    result.floor_samples.append(floor())
    result.floor_seconds = min(result.floor_samples)

    for layers in args.scaling_layers:
        deep_base, *deep_fine_tunes = build_family(cache_dir, shape.with_layers(layers))
        # Depth changes only the number of tensors. Linear has the fewest temporaries per tensor,
        # so it shows how memory scales, and other methods add a constant per tensor.
        for method in [name for name in SCALING_METHODS if name in args.methods]:
            output = _fresh(work_dir / f"scaling-{layers}-{method}")
            drop_page_cache(cold)
            spec = merge_spec(method, deep_base, deep_fine_tunes)
            run = run_evomerge_child(spec, output, max_shard_bytes=args.max_shard_bytes, label=method)
            result.scaling.append((layers, method, run))
            _fresh(output)
    return result


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _seconds(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2f}"


def _mib(value: int) -> str:
    return f"{value / MIB:.0f}"


def _ok(run: MergeRun | None) -> bool:
    """Return whether ``run`` exists and finished without error."""
    return run is not None and run.error is None


def merge_tables(result: MergeBenchmark) -> tuple[str, list[str]]:
    """Return the merge tables as markdown and the target lines."""
    time_rows = []
    memory_rows = []
    for method, run in result.evomerge.items():
        mergekit = result.mergekit.get(method)
        compared = _ok(run) and _ok(mergekit)
        time_rows.append(
            [
                method,
                _seconds(run.merge_seconds),
                format_ratio(_ratio(run.merge_seconds, result.floor_seconds)),
                _seconds(run.process_seconds) if _ok(run) else "failed",
                _seconds(mergekit.process_seconds) if _ok(mergekit) else "-",
                format_ratio(_ratio(mergekit.process_seconds, run.process_seconds)) if compared else "-",
            ]
        )
        memory_rows.append(
            [
                method,
                _mib(run.peak_rss_bytes),
                _mib(run.peak_anon_bytes),
                _mib(mergekit.peak_rss_bytes) if _ok(mergekit) else "-",
                _mib(mergekit.peak_anon_bytes) if _ok(mergekit) else "-",
                format_ratio(_ratio(run.peak_rss_bytes, mergekit.peak_rss_bytes)) if compared else "-",
            ]
        )
    time_table = markdown_table(
        [
            "method",
            "EvoMerge merge s",
            "merge / I/O floor",
            "EvoMerge process s",
            "mergekit process s",
            "speed-up vs mergekit",
        ],
        time_rows,
    )
    memory_table = markdown_table(
        [
            "method",
            "EvoMerge peak RSS MiB",
            "EvoMerge peak anon MiB",
            "mergekit peak RSS MiB",
            "mergekit peak anon MiB",
            "RSS / mergekit RSS",
        ],
        memory_rows,
    )

    errors = [f"- EvoMerge {run.label} failed: {run.error}" for run in result.evomerge.values() if run.error]
    errors += [f"- mergekit {run.label} failed: {run.error}" for run in result.mergekit.values() if run.error]

    scaling_rows = []
    by_method: dict[str, list[tuple[int, MergeRun]]] = {}
    for layers, method, run in result.scaling:
        by_method.setdefault(method, []).append((layers, run))
        scaling_rows.append(
            [method, str(layers), _seconds(run.merge_seconds), _mib(run.peak_rss_bytes), _mib(run.peak_anon_bytes)]
        )
    scaling_table = markdown_table(
        ["method", "layers", "EvoMerge merge s", "EvoMerge peak RSS MiB", "EvoMerge peak anon MiB"], scaling_rows
    )

    targets = merge_targets(result, by_method)
    parts = ["Time:\n\n" + time_table, "Memory:\n\n" + memory_table]
    if errors:
        parts.append("\n".join(errors))
    if scaling_rows:
        parts.append("Depth scaling (same tensor shapes, more layers):\n\n" + scaling_table)
    return "\n\n".join(parts), targets


def merge_targets(result: MergeBenchmark, by_method: dict[str, list[tuple[int, MergeRun]]]) -> list[str]:
    """Return one line per merge target with the measured value and whether it was met."""
    lines = []
    linear = result.evomerge.get("linear")
    linear_ratio = _ratio(linear.merge_seconds, result.floor_seconds) if linear else None
    lines.append(
        f"- linear merge time <= {LINEAR_MAX_FLOOR_RATIO:g}x the I/O floor: {format_ratio(linear_ratio)}, "
        f"{target_verdict(None if linear_ratio is None else linear_ratio <= LINEAR_MAX_FLOOR_RATIO)}"
    )

    ties = result.evomerge.get("ties")
    ties_mergekit = result.mergekit.get("ties")
    speedup = None
    if _ok(ties) and _ok(ties_mergekit):
        speedup = _ratio(ties_mergekit.process_seconds, ties.process_seconds)
    lines.append(
        f"- ties at least {TIES_MIN_SPEEDUP:g}x faster than mergekit (process wall time): {format_ratio(speedup)}, "
        f"{target_verdict(None if speedup is None else speedup >= TIES_MIN_SPEEDUP)}"
    )

    for method, mergekit in result.mergekit.items():
        run = result.evomerge[method]
        compared = _ok(run) and _ok(mergekit)
        below = run.peak_rss_bytes < mergekit.peak_rss_bytes if compared else None
        lines.append(
            f"- {method} peak RSS below mergekit's: {_mib(run.peak_rss_bytes)} MiB vs "
            f"{_mib(mergekit.peak_rss_bytes)} MiB, {target_verdict(below)}"
        )

    for method, runs in by_method.items():
        runs = sorted(runs, key=lambda item: item[0])
        if len(runs) < 2:
            continue
        (shallow_layers, shallow), (deep_layers, deep) = runs[0], runs[-1]
        for kind, deep_bytes, shallow_bytes in (
            ("RSS", deep.peak_rss_bytes, shallow.peak_rss_bytes),
            ("anon", deep.peak_anon_bytes, shallow.peak_anon_bytes),
        ):
            growth = _ratio(deep_bytes, shallow_bytes) if _ok(deep) and _ok(shallow) else None
            met = None if growth is None else growth <= 1.0 + MAX_RSS_GROWTH
            lines.append(
                f"- {method} peak {kind} at {deep_layers} layers at most {1 + MAX_RSS_GROWTH:.2f}x that at "
                f"{shallow_layers} layers: {format_ratio(growth)}, {target_verdict(met)}"
            )
    return lines


MERGE_FIGURES = """What the figures mean:

- I/O floor: seconds to copy the first input's safetensors file with `shutil.copyfile` (then fsync) and
  read the other two inputs in 16 MiB chunks, so the same bytes are read and written as in a three-model merge.
- EvoMerge merge s: the `run_merge` call alone, in a fresh child process, including header checks, the merge
  arithmetic in float32, writing, fsync and the atomic rename. `merge / I/O floor` divides it by the I/O floor.
- process s: wall time of the whole child process, Python start and imports included. The speed-up against
  mergekit compares these process times, because mergekit's time is only known for its whole process.
- peak RSS: `ru_maxrss` of the child from `os.wait4`, which includes the imported libraries (see the import-only
  child above) and the pages of the memory-mapped safetensors inputs that were mapped at the same time. Both
  tools read inputs through mmap; EvoMerge unmaps each input tensor's pages once it is merged.
  `RSS / mergekit RSS` below 1 means EvoMerge used less memory.
- peak anon: the largest `RssAnon` (heap and tensors, without mapped files) in `/proc/PID/status`, sampled every
  20 ms, so a shorter spike can be missed. Mapped input pages are clean page cache that the kernel can drop under
  memory pressure, while anonymous memory cannot be dropped without swap.
- Specs: linear averages base, ft1 and ft2 with equal weights, and slerp takes t=0.5 between base and ft1.
  The task-vector methods give ft1 and ft2 weight 0.5 over the base, with density 0.5 (ties, dare_ties, and
  della with epsilon 0.15) or density 0.9 and gamma 0.01 (breadcrumbs). model_stock uses ft1 and ft2 over
  the base. mergekit runs the same spec dictionaries as YAML with `--lazy-unpickle --no-copy-tokenizer
  --no-write-model-card --quiet`.
"""


def record_merge(result: MergeBenchmark, args: argparse.Namespace) -> tuple[str, str]:
    """Return the printed summary and the record section of a merge run."""
    tables, targets = merge_tables(result)
    shape = result.shape
    cache_note = (
        "Page cache dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before the I/O floor and before every merge."
        if result.cold_cache
        else "Page cache not dropped (warm cache): inputs are likely read from memory."
    )
    shard_note = (
        f"{args.max_shard_bytes // MIB} MiB" if args.max_shard_bytes else "the MergeOptions default"
    )
    notes = [
        f"Models: three random float32 Llama models (base, ft1, ft2 = base + N(0, {FINE_TUNE_NOISE}) noise), "
        f"hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, {shape.num_layers} layers, "
        f"{shape.num_attention_heads} heads, {shape.num_key_value_heads} key-value heads, vocabulary {shape.vocab_size}, "
        f"tied embeddings: {result.model_bytes / 1e6:.0f} MB of weights each.",
        "",
        cache_note,
        "",
        f"I/O floor: {result.floor_seconds:.2f} s, the lower of "
        f"{' and '.join(f'{value:.2f} s' for value in result.floor_samples)} measured before and after the merges. "
        f"Import-only child peak RSS: {_mib(result.import_rss_bytes)} MiB. "
        f"EvoMerge output shard size: {shard_note}.",
        "",
        f"mergekit {MERGEKIT_VERSION}: {result.mergekit_note}",
        "",
        MERGE_FIGURES,
    ]
    header = record_header("Merge", args, notes)
    body = f"{header}\n{tables}\n\nTargets:\n\n" + "\n".join(targets) + "\n"
    summary = (
        f"I/O floor {result.floor_seconds:.2f} s ({'cold' if result.cold_cache else 'warm'} cache), "
        f"import-only RSS {_mib(result.import_rss_bytes)} MiB\n\n{tables}\n\n" + "\n".join(targets) + "\n"
    )
    return summary, body


# ---------------------------------------------------------------------------
# The evaluation benchmark
# ---------------------------------------------------------------------------


def benchmark_texts(tokenizer, count: int, tokens_per_text: int, seed: int = 0) -> list[str]:
    """Return ``count`` texts of at least ``tokens_per_text`` tokens, shuffled from the tiny corpus."""
    from evomerge.testing import TINY_CORPUS

    chooser = random.Random(seed)
    texts = []
    for _ in range(count):
        parts: list[str] = []
        while len(tokenizer(" ".join(parts))["input_ids"]) < tokens_per_text:
            parts.extend(chooser.sample(TINY_CORPUS, len(TINY_CORPUS)))
        texts.append(" ".join(parts))
    return texts


def plain_perplexity(model, token_ids: list[list[int]], max_length: int, stride: int) -> tuple[float, int]:
    """Compute perplexity with one ``model(input_ids, labels=...)`` call per window, batch size 1.

    This is the Hugging Face fixed-length perplexity recipe: labels of tokens that an
    earlier window already scored are -100. Returns the perplexity and the scored tokens.
    """
    import math

    from evomerge.metrics import sliding_windows

    total_nll = 0.0
    total_tokens = 0
    with torch.inference_mode():
        for ids in token_ids:
            for window in sliding_windows(len(ids), max_length, stride):
                input_ids = torch.tensor([ids[window.begin : window.end]])
                labels = input_ids.clone()
                labels[:, : window.first_scored - window.begin] = -100
                scored = window.end - window.first_scored
                # The loss is the mean NLL over the scored tokens, so it is weighted back by their count.
                loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
                total_nll += float(loss) * scored
                total_tokens += scored
    return math.exp(total_nll / total_tokens), total_tokens


@dataclass
class Throughput:
    """One timed perplexity run: the best time of its repeats, the perplexity and the scored tokens."""

    label: str
    seconds: float
    perplexity: float
    tokens: int

    @property
    def tokens_per_second(self) -> float:
        """Scored tokens per second."""
        return self.tokens / self.seconds


def _best_of(repeats: int, function) -> tuple[float, Any]:
    """Run ``function`` ``repeats`` times and return the shortest time and the last result."""
    best = float("inf")
    value = None
    for _ in range(repeats):
        started = time.perf_counter()
        value = function()
        best = min(best, time.perf_counter() - started)
    return best, value


@dataclass
class EvaluateBenchmark:
    """The results of one ``evaluate`` run."""

    shape: ModelShape
    max_length: int
    stride: int
    texts: int
    threads: int
    throughputs: list[Throughput]
    sequential_seconds: float
    parallel_seconds: float
    candidates: int
    workers: int
    candidate_tokens: int
    sequential_errors: list[str]
    parallel_errors: list[str]


def benchmark_evaluate(args: argparse.Namespace) -> EvaluateBenchmark:
    """Time EvoMerge perplexity against the plain forward loop, then candidates one by one against parallel."""
    from transformers import LlamaForCausalLM

    from evomerge.config import EvaluationSettings
    from evomerge.devices import configure_cpu_threads
    from evomerge.evaluation import evaluate_model, parallel_evaluate_models, perplexity, tokenize_texts
    from evomerge.testing import build_tiny_tokenizer

    shape = QUICK_SHAPE if args.quick else SMOLLM2_135M
    threads = configure_cpu_threads()
    tokenizer = build_tiny_tokenizer()
    texts = benchmark_texts(tokenizer, args.texts, args.tokens_per_text)
    token_ids = tokenize_texts(tokenizer, texts)

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(shape)).eval()
    max_length, stride = args.max_length, args.stride

    # One untimed pass per path loads kernels and allocator pools.
    plain_perplexity(model, token_ids[:1], max_length, stride)

    def evomerge_run(batch_size: int):
        return perplexity(
            model, tokenizer, texts, max_length=max_length, stride=stride, batch_size=batch_size, device="cpu"
        )

    paths = {
        "plain transformers loop, batch 1": lambda: plain_perplexity(model, token_ids, max_length, stride),
        "evomerge.evaluation.perplexity, batch 1": lambda: evomerge_run(1),
        f"evomerge.evaluation.perplexity, batch {args.batch_size}": lambda: evomerge_run(args.batch_size),
    }
    # The paths take turns within each repeat, so a change in machine load hits all of them alike.
    best: dict[str, Throughput] = {}
    for _ in range(args.repeats):
        for label, function in paths.items():
            seconds, (value, tokens) = _best_of(1, function)
            if label not in best or seconds < best[label].seconds:
                best[label] = Throughput(label, seconds, value, tokens)
    throughputs = list(best.values())
    del model

    candidates = build_family(Path(args.cache), shape)
    # The texts go through a JSONL file, as a project's evaluation settings would name them.
    text_file = Path(args.cache) / "work" / "evaluate-texts.jsonl"
    text_file.parent.mkdir(parents=True, exist_ok=True)
    text_file.write_text(
        "".join(json.dumps({"text": text}) + "\n" for text in texts[: args.candidate_texts]), encoding="utf-8"
    )
    settings = EvaluationSettings(
        search_texts=[str(text_file)],
        max_length=max_length,
        stride=stride,
        batch_size=args.batch_size,
        device="cpu",
        dtype="float32",
    )
    started = time.perf_counter()
    sequential = [evaluate_model(path, settings) for path in candidates]
    sequential_seconds = time.perf_counter() - started
    started = time.perf_counter()
    parallel = parallel_evaluate_models(candidates, settings, max_workers=args.workers)
    parallel_seconds = time.perf_counter() - started
    for way, results in (("one by one", sequential), ("parallel", parallel)):
        for path, scores in zip(candidates, results):
            if scores.failed:
                logger.warning("Evaluation of %s (%s) failed: %s", path, way, scores.error)

    return EvaluateBenchmark(
        shape=shape,
        max_length=max_length,
        stride=stride,
        texts=len(texts),
        threads=threads,
        throughputs=throughputs,
        sequential_seconds=sequential_seconds,
        parallel_seconds=parallel_seconds,
        candidates=len(candidates),
        workers=args.workers,
        candidate_tokens=sum(scores.tokens or 0 for scores in sequential),
        sequential_errors=[scores.error or "" for scores in sequential if scores.failed],
        parallel_errors=[scores.error or "" for scores in parallel if scores.failed],
    )


EVALUATE_FIGURES = """What the figures mean:

- tokens/s: scored tokens (every token after the first of each text, each once) divided by the best wall time
  of the repeats, on CPU in float32. The three paths take turns within each repeat. `vs plain loop` divides
  it by the plain loop's tokens/s, so above 1 is faster.
- plain transformers loop: `model(input_ids, labels=...)` once per sliding window, with labels of already
  scored tokens set to -100, over the same windows as `evomerge.metrics.sliding_windows`.
- perplexity: both paths must agree, which checks that they scored the same tokens. A random model has a
  perplexity of the order of its vocabulary size.
- candidates: `evaluate_model` on each of base, ft1 and ft2 in turn, against `parallel_evaluate_models` with
  the given workers on the same folders and settings; both include loading each model from disk.
"""


def record_evaluate(result: EvaluateBenchmark, args: argparse.Namespace) -> tuple[str, str]:
    """Return the printed summary and the record section of an evaluate run."""
    baseline = result.throughputs[0].tokens_per_second
    rows = [
        [
            item.label,
            str(item.tokens),
            f"{item.seconds:.2f}",
            f"{item.tokens_per_second:.0f}",
            format_ratio(item.tokens_per_second / baseline),
            f"{item.perplexity:.3f}",
        ]
        for item in result.throughputs
    ]
    table = markdown_table(["path", "tokens", "best s", "tokens/s", "vs plain loop", "perplexity"], rows)
    # A speed-up is only meaningful when both ways scored every candidate.
    all_scored = not result.sequential_errors and not result.parallel_errors
    speedup = result.sequential_seconds / result.parallel_seconds if all_scored else None
    candidate_table = markdown_table(
        ["candidates", "way", "failed", "wall s", "speed-up vs one by one"],
        [
            [
                str(result.candidates),
                "one by one (evaluate_model)",
                str(len(result.sequential_errors)),
                f"{result.sequential_seconds:.2f}",
                "1.00x" if all_scored else "-",
            ],
            [
                str(result.candidates),
                f"parallel_evaluate_models, {result.workers} workers",
                str(len(result.parallel_errors)),
                f"{result.parallel_seconds:.2f}",
                format_ratio(speedup),
            ],
        ],
    )
    errors = sorted(set(result.sequential_errors + result.parallel_errors))
    if errors:
        candidate_table += "\n\nCandidate errors:\n\n" + "\n".join(f"- {error}" for error in errors)

    same_batch = result.throughputs[1].tokens_per_second / baseline
    agreement = max(abs(item.perplexity - result.throughputs[0].perplexity) for item in result.throughputs)
    relative = agreement / result.throughputs[0].perplexity
    targets = [
        f"- EvoMerge perplexity at batch 1 at least {EVALUATE_MIN_RATIO:g}x the plain loop's tokens/s: "
        f"{format_ratio(same_batch)}, {target_verdict(same_batch >= EVALUATE_MIN_RATIO)}",
        f"- perplexities agree within 1e-4 relative: largest difference {relative:.1e}, "
        f"{target_verdict(relative <= 1e-4)}",
        f"- every candidate scored both one by one and in parallel: "
        f"{len(result.sequential_errors) + len(result.parallel_errors)} failures, {target_verdict(all_scored)}",
    ]
    shape = result.shape
    notes = [
        f"Model: random float32 Llama, hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, "
        f"{shape.num_layers} layers, {shape.num_attention_heads} heads, {shape.num_key_value_heads} key-value heads, "
        f"vocabulary {shape.vocab_size}. Tokenizer: `evomerge.testing.build_tiny_tokenizer()`.",
        "",
        f"Texts: {result.texts}, windows of {result.max_length} tokens with stride {result.stride}; "
        f"torch CPU threads: {result.threads}. Candidates scored {result.candidate_tokens} tokens in total.",
        "",
        EVALUATE_FIGURES,
    ]
    body = (
        record_header("Evaluate", args, notes)
        + f"\n{table}\n\n{candidate_table}\n\nTargets:\n\n"
        + "\n".join(targets)
        + "\n"
    )
    summary = f"{table}\n\n{candidate_table}\n\n" + "\n".join(targets) + "\n"
    return summary, body


# ---------------------------------------------------------------------------
# The GPU benchmark
# ---------------------------------------------------------------------------


def benchmark_gpu(args: argparse.Namespace) -> tuple[str, str]:
    """Time one ties merge and one perplexity run on CUDA against CPU, or record that CUDA is absent."""
    if not torch.cuda.is_available():
        message = f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__})"
        body = record_header("GPU", args, [message, ""])
        return message + "\n", body

    # NOTE: this CUDA branch has only been read, never run: no machine with a GPU was available.
    from transformers import LlamaForCausalLM

    from evomerge.evaluation import perplexity
    from evomerge.testing import build_tiny_tokenizer

    shape = QUICK_SHAPE if args.quick else SMOLLM2_135M
    cache_dir = Path(args.cache)
    work_dir = cache_dir / "work"
    work_dir.mkdir(parents=True, exist_ok=True)
    base, *fine_tunes = build_family(cache_dir, shape)
    spec = merge_spec("ties", base, fine_tunes)

    merges = {}
    for device in ("cpu", "cuda"):
        output = _fresh(work_dir / f"gpu-{device}")
        merges[device] = run_evomerge_child(spec, output, max_shard_bytes=None, device=device, label=device)
        _fresh(output)

    tokenizer = build_tiny_tokenizer()
    texts = benchmark_texts(tokenizer, args.texts, args.tokens_per_text)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(shape)).eval()
    throughputs = {}
    for device in ("cpu", "cuda"):
        model = model.to(device)

        def run(device=device):
            value = perplexity(
                model, tokenizer, texts, max_length=args.max_length, stride=args.stride,
                batch_size=args.batch_size, device=device,
            )
            if device == "cuda":
                torch.cuda.synchronize()
            return value

        run()
        seconds, (value, tokens) = _best_of(args.repeats, run)
        throughputs[device] = Throughput(device, seconds, value, tokens)

    rows = [
        [
            "ties merge, density 0.5",
            _seconds(merges["cpu"].merge_seconds),
            _seconds(merges["cuda"].merge_seconds),
            format_ratio(_ratio(merges["cpu"].merge_seconds, merges["cuda"].merge_seconds)),
        ],
        [
            f"perplexity, batch {args.batch_size} (float32 tokens/s)",
            f"{throughputs['cpu'].tokens_per_second:.0f}",
            f"{throughputs['cuda'].tokens_per_second:.0f}",
            format_ratio(throughputs["cuda"].tokens_per_second / throughputs["cpu"].tokens_per_second),
        ],
    ]
    table = markdown_table(["task", "CPU", "CUDA", "CUDA speed-up"], rows)
    notes = [
        "Merge rows are seconds of the `run_merge` call (`MergeOptions.device`); perplexity rows are tokens/s.",
        "",
    ]
    body = record_header("GPU", args, notes) + f"\n{table}\n"
    return table + "\n", body


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _method_list(text: str) -> list[str]:
    methods = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in methods if name not in PARAMETER_METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method {unknown[0]!r}: use a comma-separated subset of {','.join(PARAMETER_METHODS)}"
        )
    return methods


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: give a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: give a whole number >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m evomerge.benchmarks``."""
    parser = argparse.ArgumentParser(
        prog="python -m evomerge.benchmarks",
        description="Benchmark EvoMerge and record the results in docs/benchmarks.md.",
    )
    parser.add_argument("--cache", default=str(DEFAULT_CACHE_DIR), help="folder for the random benchmark models")
    parser.add_argument("--doc", default=str(DEFAULT_DOC_PATH), help="record file whose section is replaced")
    parser.add_argument("--quick", action="store_true", help="use small shapes for a smoke run of a few seconds")
    subcommands = parser.add_subparsers(dest="subcommand", required=True)

    merge = subcommands.add_parser("merge", help="merge methods against the I/O floor and mergekit")
    merge.add_argument("--layers", type=_positive_int, help="decoder layers of the main models (default: 30, quick: 4)")
    merge.add_argument(
        "--methods", type=_method_list, default=list(PARAMETER_METHODS), help="comma-separated methods to run"
    )
    merge.add_argument(
        "--mergekit",
        help=f"mergekit-yaml executable, or 'none' to skip mergekit (default: {DEFAULT_MERGEKIT} if it exists)",
    )
    merge.add_argument(
        "--scaling-layers",
        type=_positive_int,
        nargs="*",
        help="layer counts of the depth-scaling merges (default: 16 32, quick: 2 4); give none to skip",
    )
    merge.add_argument(
        "--max-shard-mb",
        type=_positive_int,
        help="EvoMerge output shard size in MiB (default: the MergeOptions default)",
    )
    merge.add_argument(
        "--no-drop-caches",
        dest="drop_caches",
        action="store_false",
        help="keep the page cache instead of dropping it before each measurement (dropping needs root)",
    )

    evaluate = subcommands.add_parser("evaluate", help="perplexity throughput and candidate batching")
    gpu = subcommands.add_parser("gpu", help="CUDA against CPU, or record that there is no CUDA device")
    for command in (evaluate, gpu):
        command.add_argument("--texts", type=_positive_int, help="number of texts (default: 2)")
        command.add_argument("--tokens-per-text", type=_positive_int, help="tokens per text (default: 384, quick: 64)")
        command.add_argument("--max-length", type=_positive_int, help="window length in tokens (default: 256, quick: 32)")
        command.add_argument("--stride", type=_positive_int, help="window stride in tokens (default: 128, quick: 16)")
        command.add_argument("--batch-size", type=_positive_int, default=4, help="windows per forward pass")
        command.add_argument("--repeats", type=_positive_int, help="timed repeats; the best counts (default: 3, quick: 1)")
    evaluate.add_argument(
        "--candidate-texts", type=_positive_int, default=1, help="texts each candidate is evaluated on"
    )
    evaluate.add_argument("--workers", type=_positive_int, default=2, help="workers of parallel_evaluate_models")

    orchestration = subcommands.add_parser(
        "orchestration", help="Prefect's share of a small tournament, and a fully cached re-run"
    )
    orchestration.add_argument("--hidden-size", type=_positive_int, default=256, help="hidden size of the models")
    orchestration.add_argument("--layers", type=_positive_int, default=8, help="decoder layers of the models")
    orchestration.add_argument("--generations", type=_positive_int, default=3, help="generations of the tournament")
    orchestration.add_argument("--population", type=_positive_int, default=6, help="candidates per generation")

    scaleout = subcommands.add_parser("scaleout", help="evaluations on one against two Dask worker processes")
    scaleout.add_argument("--models", type=_positive_int, default=4, help="models to evaluate")
    scaleout.add_argument("--workers", default="1,2", help="comma-separated worker process counts (default 1,2)")
    scaleout.add_argument("--hidden-size", type=_positive_int, default=512, help="hidden size of the models")
    scaleout.add_argument("--repeats", type=_positive_int, default=3, help="timed rounds per cluster size; the fastest counts")
    return parser


def benchmark_orchestration(args: argparse.Namespace) -> tuple[str, str]:
    """Time the tournament with and without Prefect and a cached re-run; return summary and record."""
    from evomerge.orchestration_benchmark import format_orchestration, measure_orchestration

    size = {"hidden_size": 64, "num_layers": 2, "generations": 1, "population_size": 2} if args.quick else {
        "hidden_size": args.hidden_size,
        "num_layers": args.layers,
        "generations": args.generations,
        "population_size": args.population,
    }
    table = format_orchestration(measure_orchestration(**size))
    notes = [
        "A trivial flow runs first, so the one-off start of Prefect's temporary API server is reported on its own "
        "and is not part of the first flow run.",
        "",
    ]
    return table + "\n", record_header("Orchestration overhead", args, notes) + "\n" + table + "\n"


def benchmark_scaleout(args: argparse.Namespace) -> tuple[str, str]:
    """Time evaluations on Dask clusters of each worker count; return summary and record."""
    import tempfile

    from evomerge.scaleout_benchmark import markdown_section, run_scaleout_benchmark

    try:
        worker_counts = tuple(int(part) for part in args.workers.split(","))
    except ValueError:
        raise SystemExit(f"--workers {args.workers!r} is invalid: give comma-separated integers such as 1,2") from None
    models, hidden_size, repeats = (2, 64, 1) if args.quick else (args.models, args.hidden_size, args.repeats)
    with tempfile.TemporaryDirectory(prefix="evomerge-scaleout-") as root:
        result = run_scaleout_benchmark(
            Path(root), models=models, worker_counts=worker_counts, hidden_size=hidden_size, repeats=repeats
        )
    table = markdown_section(result, invoked_command(args.argv))
    return table, record_header("Scale-out: one against two workers", args, []) + "\n" + table


def _fill_defaults(args: argparse.Namespace) -> None:
    """Set the options whose default depends on --quick."""
    quick = args.quick
    if args.subcommand in ("orchestration", "scaleout"):
        return
    if args.subcommand == "merge":
        if args.scaling_layers is None:
            args.scaling_layers = [2, 4] if quick else [16, 32]
        args.max_shard_bytes = args.max_shard_mb * MIB if args.max_shard_mb else None
        return
    defaults = {
        "texts": (2, 2),
        "tokens_per_text": (64, 384),
        "max_length": (32, 256),
        "stride": (16, 128),
        "repeats": (1, 3),
    }
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if quick else full_value)
    if args.stride > args.max_length:
        raise SystemExit(f"--stride {args.stride} is larger than --max-length {args.max_length}: use stride <= max length")


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark subcommand, print its table and update its section of the record file."""
    from evomerge.logging_config import setup_logging

    # The orchestration and scale-out benchmarks start Prefect and Dask: no telemetry.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    # Other jobs on the machine change every timing, so the record shows the load around the run.
    args.load_at_start = os.getloadavg()
    _fill_defaults(args)
    setup_logging(log_file=None)

    if args.subcommand == "merge":
        summary, body = record_merge(benchmark_merge(args), args)
    elif args.subcommand == "evaluate":
        summary, body = record_evaluate(benchmark_evaluate(args), args)
    elif args.subcommand == "orchestration":
        summary, body = benchmark_orchestration(args)
    elif args.subcommand == "scaleout":
        summary, body = benchmark_scaleout(args)
    else:
        summary, body = benchmark_gpu(args)

    sys.stdout.write(summary)
    update_record(Path(args.doc), args.subcommand, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
