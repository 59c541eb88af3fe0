"""Configuration loading: unknown keys, YAML round trip, and the evaluation settings hash."""

from __future__ import annotations

import pytest
import yaml

from evomerge.config import Configuration, EvaluationSettings, load_config, save_config
from evomerge.exceptions import ConfigError


def _write(tmp_path, data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    "data, location, suggestion",
    [
        ({"models": [{"name": "a", "path": "x"}], "evolution": {"generatons": 3}}, "evolution.generatons", "generations"),
        ({"models": [{"name": "a", "path": "x", "revison": "main"}]}, "models.0.revison", "revision"),
        ({"models": [{"name": "a", "path": "x"}], "storag": {}}, "storag", "storage"),
    ],
)
def test_unknown_key_names_closest(tmp_path, data, location, suggestion):
    with pytest.raises(ConfigError) as raised:
        load_config(_write(tmp_path, data))
    message = str(raised.value)
    assert f"unknown key {location!r}" in message
    assert f"did you mean {suggestion!r}" in message


def test_invalid_value_named(tmp_path):
    data = {"models": [{"name": "a", "path": "x"}], "evolution": {"population_size": 4, "elite_count": 4}}
    with pytest.raises(ConfigError, match="elite_count 4 must be smaller than population_size 4"):
        load_config(_write(tmp_path, data))


def test_duplicate_model_names_rejected(tmp_path):
    data = {"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}
    with pytest.raises(ConfigError, match="repeated: a"):
        load_config(_write(tmp_path, data))


def test_unknown_base_model_rejected(tmp_path):
    data = {"models": [{"name": "a", "path": "x"}], "merge": {"base_model": "b"}}
    with pytest.raises(ConfigError, match="base_model 'b' is not one of the model names"):
        load_config(_write(tmp_path, data))


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(_write(tmp_path, ["models"]))


def test_yaml_round_trip(tmp_path):
    config = Configuration(models=[{"name": "a", "path": "x"}, {"name": "b", "path": "org/model", "revision": "v1"}])
    path = save_config(config, tmp_path / "out.yaml")
    assert load_config(path) == config


def test_settings_hash_follows_file_content(tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("first version")
    settings = EvaluationSettings(search_texts=[str(text)])
    before = settings.canonical_hash()

    text.write_text("second version")

    assert settings.canonical_hash() != before


def test_settings_hash_follows_each_field():
    base = EvaluationSettings(prompts=["Hello"])
    assert base.canonical_hash() == EvaluationSettings(prompts=["Hello"]).canonical_hash()
    assert base.canonical_hash() != EvaluationSettings(prompts=["Hello!"]).canonical_hash()
    assert base.canonical_hash() != EvaluationSettings(prompts=["Hello"], max_new_tokens=33).canonical_hash()


def test_settings_hash_long_literal_text():
    settings = EvaluationSettings(search_texts=["x" * 300, "y" * 5000])
    assert len(settings.canonical_hash()) == 16


def test_relative_paths_follow_config_file(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    (folder / "models" / "a").mkdir(parents=True)
    (folder / "search.txt").write_text("some text")
    path = folder / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": [{"name": "a", "path": "models/a"}, {"name": "hub", "path": "org/model"}],
                "evaluation": {"search_texts": ["search.txt", "a literal sentence"]},
            }
        )
    )
    monkeypatch.chdir(tmp_path)

    config = load_config(path)

    assert config.models[0].path == str((folder / "models" / "a").resolve())
    assert config.models[1].path == "org/model"
    assert config.evaluation.search_texts == [str((folder / "search.txt").resolve()), "a literal sentence"]
