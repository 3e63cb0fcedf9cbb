"""The typed params loader: unknown keys, wrong types, allowed values and ranges, each a one-line
ConfigError naming the file and the key."""

import dataclasses

import pytest

from pipeline.config import CorporaConfig, HubCorpus, NormalizeConfig, load_params, load_section, section_from_dict
from pipeline.errors import ConfigError


def write_params(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path, section, cls) -> str:
    with pytest.raises(ConfigError) as error:
        load_section(path, section, cls)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


# --- the real params.yaml ---------------------------------------------------------------------------


def test_the_repository_params_load_into_their_sections(repo_root):
    corpora = load_section(repo_root / "params.yaml", "corpora", CorporaConfig)
    assert corpora.source in ("sample", "mirror", "hub")
    assert corpora.hub["mic"] == HubCorpus(repo="SALT-NLP/MIC", revision="main", file="MIC.zip")
    assert corpora.hub["daily_dialog"].revision == "refs/convert/parquet"
    assert sorted(corpora.hub) == sorted(["prosocial_dialog", "mic", "daily_dialog", "persona_chat",
                                          "empathetic_dialogues", "blended_skill_talk", "diasafety", "toxichat"])
    toxichat = corpora.hub["toxichat"]  # JSON lines at a pinned commit of its GitHub repository
    assert len(toxichat.revision) == 40 and sorted(toxichat.data_files) == sorted(["train", "validation", "test"])
    assert all("{revision}" in url for url in toxichat.data_files.values())
    normalize = load_section(repo_root / "params.yaml", "normalize", NormalizeConfig)
    assert isinstance(normalize.max_chars, int) and normalize.max_chars >= 16
    assert sum(normalize.split_fractions.values()) == pytest.approx(1)


def test_sections_are_frozen_dataclasses():
    config = NormalizeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_chars = 5  # type: ignore[misc]


def test_a_section_falls_back_to_its_defaults(tmp_path):
    path = write_params(tmp_path, "normalize: {}\ncorpora: {}\n")
    assert load_section(path, "normalize", NormalizeConfig) == NormalizeConfig()
    assert load_section(path, "corpora", CorporaConfig).source == "sample"


def test_values_are_read_and_converted(tmp_path):
    path = write_params(tmp_path, "normalize:\n  max_chars: 300\n"
                                  "  split_fractions: {train: 0.5, validation: 0.25, test: 0.25}\n")
    config = load_section(path, "normalize", NormalizeConfig)
    assert config.max_chars == 300
    assert config.split_fractions == {"train": 0.5, "validation": 0.25, "test": 0.25}
    # An integer share is accepted where a float is expected.
    path = write_params(tmp_path, "normalize:\n  split_fractions: {train: 1, validation: 0.0001, test: 0.0001}\n")
    with pytest.raises(ConfigError, match="sum to 1"):
        load_section(path, "normalize", NormalizeConfig)


# --- unknown keys -----------------------------------------------------------------------------------


def test_an_unknown_key_is_named(tmp_path):
    path = write_params(tmp_path, "normalize:\n  max_char: 300\n")
    message = config_error(path, "normalize", NormalizeConfig)
    assert "normalize.max_char'" in message
    assert "max_chars" in message  # the allowed keys are listed


def test_an_unknown_nested_key_is_named_with_its_full_path(tmp_path):
    path = write_params(tmp_path, "corpora:\n  hub:\n    mic: {repo: SALT-NLP/MIC, revision: main, x: 1}\n")
    message = config_error(path, "corpora", CorporaConfig)
    assert "'corpora.hub.mic.x'" in message


def test_an_unknown_corpus_in_a_per_corpus_mapping_is_rejected(tmp_path):
    path = write_params(tmp_path, "corpora:\n  overrides: {daily_dailog: mirror}\n")
    message = config_error(path, "corpora", CorporaConfig)
    assert "corpora.overrides" in message and "daily_dailog" in message


# --- types and values -------------------------------------------------------------------------------


@pytest.mark.parametrize("yaml_value, shown", [
    ("'300'", "'300'"),  # a string for an int
    ("true", "True"),  # a bool is not an int
    ("300.5", "300.5"),  # a float is not an int
    ("[300]", "[300]"),
])
def test_a_wrong_type_names_key_and_value(tmp_path, yaml_value, shown):
    path = write_params(tmp_path, f"normalize:\n  max_chars: {yaml_value}\n")
    message = config_error(path, "normalize", NormalizeConfig)
    assert f"normalize.max_chars = {shown}" in message
    assert "expected an integer" in message


def test_a_bool_is_not_a_number_for_a_float(tmp_path):
    path = write_params(tmp_path, "normalize:\n  split_fractions: {train: true, validation: 0.1, test: 0.1}\n")
    message = config_error(path, "normalize", NormalizeConfig)
    assert "normalize.split_fractions.train = True" in message and "expected a number" in message


def test_a_string_where_a_mapping_is_expected(tmp_path):
    path = write_params(tmp_path, "corpora:\n  hub:\n    mic: SALT-NLP/MIC\n")
    message = config_error(path, "corpora", CorporaConfig)
    assert "corpora.hub.mic = 'SALT-NLP/MIC'" in message and "mapping" in message


def test_a_literal_value_outside_its_choices_is_named(tmp_path):
    path = write_params(tmp_path, "corpora:\n  source: s3\n")
    message = config_error(path, "corpora", CorporaConfig)
    assert "corpora.source = 's3'" in message
    assert "'sample'" in message and "'mirror'" in message and "'hub'" in message


def test_a_literal_inside_a_mapping_is_checked(tmp_path):
    path = write_params(tmp_path, "corpora:\n  overrides: {mic: local}\n")
    message = config_error(path, "corpora", CorporaConfig)
    assert "corpora.overrides.mic = 'local'" in message


def test_a_hub_source_needs_a_hub_entry_for_the_corpus(tmp_path):
    path = write_params(tmp_path, "corpora:\n  source: sample\n  overrides: {mic: hub}\n")
    message = config_error(path, "corpora", CorporaConfig)
    assert "corpora.hub" in message and "mic" in message
    # With the entry it loads, and only mic comes from the hub.
    path = write_params(tmp_path, "corpora:\n  overrides: {mic: hub}\n"
                                  "  hub: {mic: {repo: SALT-NLP/MIC, revision: main, file: MIC.zip}}\n")
    config = load_section(path, "corpora", CorporaConfig)
    assert config.source_of("mic") == "hub" and config.source_of("daily_dialog") == "sample"


# --- ranges -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fractions, allowed", [
    ("{train: 0.8, validation: 0.1, test: 0.2}", "sum to 1"),
    ("{train: 0.9, validation: 0.1}", "needs exactly the keys"),
    ("{train: 0.8, validation: 0.1, test: 0.1, dev: 0.0}", "needs exactly the keys"),
    ("{train: 1.1, validation: -0.1, test: 0.0}", "positive"),
])
def test_split_fractions_are_checked(tmp_path, fractions, allowed):
    path = write_params(tmp_path, f"normalize:\n  split_fractions: {fractions}\n")
    message = config_error(path, "normalize", NormalizeConfig)
    assert "normalize.split_fractions" in message and allowed in message


@pytest.mark.parametrize("key, value", [("max_chars", 15), ("max_context_turns", 0)])
def test_lower_bounds(tmp_path, key, value):
    path = write_params(tmp_path, f"normalize:\n  {key}: {value}\n")
    message = config_error(path, "normalize", NormalizeConfig)
    assert f"normalize.{key} = {value}" in message and "at least" in message


def test_a_missing_required_key_is_named(tmp_path):
    # HubCorpus has no default for `revision`.
    path = write_params(tmp_path, "corpora:\n  hub:\n    mic: {repo: SALT-NLP/MIC}\n")
    message = config_error(path, "corpora", CorporaConfig)
    assert "missing key 'corpora.hub.mic.revision'" in message
    with pytest.raises(ConfigError, match="missing key 'corpora.hub.mic.repo'"):
        section_from_dict({"hub": {"mic": {"revision": "main"}}}, "corpora", CorporaConfig)


# --- the file itself --------------------------------------------------------------------------------


def test_a_missing_params_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as error:
        load_section(path, "normalize", NormalizeConfig)
    assert str(path) in str(error.value)


def test_a_missing_section(tmp_path):
    path = write_params(tmp_path, "corpora: {}\n")
    message = config_error(path, "normalize", NormalizeConfig)
    assert "section 'normalize' is missing" in message


@pytest.mark.parametrize("text, reason", [
    ("normalize: [1, 2\n", "not valid YAML"),
    ("normalize:\n  max_chars: 1\n max_context_turns: 2\n", "not valid YAML"),
    ("- a list\n- not sections\n", "mapping of sections"),
    ("", "mapping of sections"),
])
def test_a_malformed_params_file(tmp_path, text, reason):
    path = write_params(tmp_path, text)
    with pytest.raises(ConfigError, match=reason) as error:
        load_params(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_a_section_that_is_not_a_mapping(tmp_path):
    path = write_params(tmp_path, "normalize: 5\n")
    message = config_error(path, "normalize", NormalizeConfig)
    assert "normalize = 5" in message and "mapping" in message
