"""The command line, run as a user runs it: in a subprocess or through ``main``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from evomerge.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from evomerge.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evomerge.cli", *args, "--log-file", str((cwd or REPO_ROOT) / "cli-test.log")],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd or REPO_ROOT,
        timeout=300,
    )


def test_help_lists_every_action():
    completed = _cli("--help")
    assert completed.returncode == 0
    for flag in ("--run", "--evaluate", "--generate", "--generate-config", "--merge", "--report", "--model1", "--use-cli", "--seed", "--output-dir", "--verbose"):
        assert flag in completed.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "choose exactly one action"),
        (["--run", "--evaluate", "x"], "choose exactly one action"),
        (["--generate", "somewhere"], "--generate needs --prompt"),
        (["--merge", "merge.yaml"], "--merge needs --output"),
        (["--evaluate", "x", "--model1", "y"], "only go with --run"),
        (["--run", "--json"], "only go with --evaluate"),
    ],
)
def test_wrong_flag_combinations(args, message, tmp_path, capsys):
    code = main([*args, "--log-file", str(tmp_path / "log")])
    assert code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_missing_config_file_is_usage_error(tmp_path, capsys):
    code = main(["--run", "--config", str(tmp_path / "nope.yaml"), "--log-file", str(tmp_path / "log")])
    assert code == EXIT_USAGE
    assert "nope.yaml" in capsys.readouterr().err


def test_invalid_yaml_is_usage_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    code = main(["--run", "--config", str(bad), "--log-file", str(tmp_path / "log")])
    assert code == EXIT_USAGE
    assert "not valid YAML" in capsys.readouterr().err


def test_misspelt_key_names_closest(tmp_path, capsys, tiny_family):
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"name": "a", "path": str(tiny_family[0])}], "evolution": {"populaton_size": 4}}))
    code = main(["--run", "--config", str(bad), "--log-file", str(tmp_path / "log")])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "evolution.populaton_size" in err
    assert "population_size" in err


def test_merge_mergekit_config(tmp_path, tiny_family):
    base, ft1, ft2 = tiny_family[:3]
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(ft1), "parameters": {"weight": 0.25}},
            {"model": str(ft2), "parameters": {"weight": 0.75}},
        ],
        "dtype": "float32",
    }
    config_path = tmp_path / "merge.yml"
    config_path.write_text(yaml.safe_dump(config))
    output = tmp_path / "merged"

    completed = _cli("--merge", str(config_path), "--output", str(output), cwd=tmp_path)

    assert completed.returncode == 0, completed.stderr
    assert Path(completed.stdout.strip().splitlines()[-1]) == output
    name = "model.layers.0.mlp.up_proj.weight"
    with safe_open(ft1 / "model.safetensors", "pt") as a, safe_open(ft2 / "model.safetensors", "pt") as b, safe_open(output / "model.safetensors", "pt") as merged:
        expected = 0.25 * a.get_tensor(name) + 0.75 * b.get_tensor(name)
        assert (merged.get_tensor(name) - expected).abs().max().item() < 1e-6


def test_merge_missing_model_exit_code(tmp_path):
    config_path = tmp_path / "merge.yml"
    config_path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(tmp_path / "absent")}, {"model": str(tmp_path / "gone")}]}))
    completed = _cli("--merge", str(config_path), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert completed.returncode == EXIT_USAGE
    assert "absent" in completed.stderr
    assert not (tmp_path / "out").exists()


def test_evaluate_json_has_perplexity(tmp_path, tiny_family):
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    completed = _cli("--evaluate", str(tiny_family[1]), "--eval-text", str(text), "--json", cwd=tmp_path)
    assert completed.returncode == EXIT_OK, completed.stderr
    payload = json.loads(completed.stdout.strip().splitlines()[-1])
    assert payload["perplexity"] > 1.0
    assert payload["failed"] is False
    assert "fitness" in payload


def test_generate_prints_text(tmp_path, tiny_family):
    completed = _cli("--generate", str(tiny_family[1]), "--prompt", "def add", "--max-length", "8", cwd=tmp_path)
    assert completed.returncode == EXIT_OK, completed.stderr
    assert completed.stdout.strip() != ""


def test_generate_config_from_stdin(tmp_path, tiny_family):
    answers = "\n".join(
        [
            str(tiny_family[0]),
            str(tiny_family[1]),
            str(tiny_family[2]),
            "",  # end of the model list
            "base",  # base model name
            "linear,tiess",  # a typo: asked again
            "linear,ties",
            "0",  # population size below 1: asked again
            "4",
            "2",
            "",  # mutation rate: default
            "5",
            "",  # no evaluation files
            str(tmp_path / "wizard.yaml"),
        ]
    )
    completed = _cli("--generate-config", stdin=answers + "\n", cwd=tmp_path)

    assert completed.returncode == EXIT_OK, completed.stdout + completed.stderr
    assert "invalid answer 'linear,tiess'" in completed.stdout
    config = load_config(tmp_path / "wizard.yaml")
    assert [model.name for model in config.models] == ["base", "ft1", "ft2"]
    assert config.merge.techniques == ["linear", "ties"]
    assert config.evolution.population_size == 4
    assert config.evolution.generations == 2
    assert config.evolution.seed == 5


def test_generate_config_too_few_models(tmp_path):
    completed = _cli("--generate-config", stdin="only-one\n", cwd=tmp_path)
    assert completed.returncode == EXIT_USAGE
    assert "at least two" in completed.stderr


def test_evaluate_failed_model_exit_code(tmp_path, tiny_family):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_family[1], broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})

    completed = _cli("--evaluate", str(broken), "--json", cwd=tmp_path)
    assert completed.returncode == EXIT_FAILED
    payload = json.loads(completed.stdout.strip().splitlines()[-1])
    assert payload["failed"] is True
    assert payload["error"]


def _merge_and_generate(tmp_path: Path, config: dict) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_path = tmp_path / "layers.yml"
    config_path.write_text(yaml.safe_dump(config))
    output = tmp_path / "out"
    completed = _cli("--merge", str(config_path), "--output", str(output), cwd=tmp_path)
    assert completed.returncode == EXIT_OK, completed.stderr

    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    ids = tokenizer("def add", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4
    return output


def test_merge_frankenmerge_config(tmp_path, tiny_family):
    base, ft1 = tiny_family[:2]
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(ft1), "layer_range": [2, 4]}]},
        ],
        "dtype": "float32",
    }
    output = _merge_and_generate(tmp_path, config)
    assert json.loads((output / "config.json").read_text())["num_hidden_layers"] == 5


def test_merge_layer_path_config(tmp_path, tiny_family):
    base, ft1 = tiny_family[:2]
    config = {
        "merge_method": "dfs",
        "embed_model": str(base),
        "layer_path": [
            {"model": str(base), "layer": 0},
            {"model": str(ft1), "layer": 1, "scale": 0.8},
            {"model": str(ft1), "layer": 1, "scale": 1.25},
            {"model": str(base), "layer": 3},
        ],
    }
    output = _merge_and_generate(tmp_path, config)
    assert json.loads((output / "config.json").read_text())["num_hidden_layers"] == 4


def test_merge_refuses_existing_output(tmp_path, tiny_family, capsys):
    config_path = tmp_path / "merge.yml"
    config_path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(tiny_family[1])}, {"model": str(tiny_family[2])}]}))
    (tmp_path / "out").mkdir()
    code = main(["--merge", str(config_path), "--output", str(tmp_path / "out"), "--log-file", str(tmp_path / "log")])
    assert code == EXIT_USAGE
    assert "already exists" in capsys.readouterr().err


def test_generate_config_writes_absolute_paths(tmp_path, tiny_family):
    import os

    text = tmp_path / "search.txt"
    text.write_text("The quick brown fox.")
    relative_models = [os.path.relpath(path, tmp_path) for path in tiny_family[:2]]
    answers = [*relative_models, "", "", "", "", "", "", "", "search.txt", str(tmp_path / "abs.yaml")]
    completed = _cli("--generate-config", stdin="\n".join(answers) + "\n", cwd=tmp_path)

    assert completed.returncode == EXIT_OK, completed.stdout + completed.stderr
    config = load_config(tmp_path / "abs.yaml")
    assert config.models[0].path == str(tiny_family[0].resolve())
    assert config.evaluation.search_texts == [str(text.resolve())]
