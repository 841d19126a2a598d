from __future__ import annotations

import json

import pytest

from kernel_lib.config import CONFIG_VERSION, ConfigError, PipelineConfig, ThresholdRule


def test_round_trip_through_json(tmp_path):
    cfg = PipelineConfig(encoder="efficientnet_b0", decoder_channels=(64, 32),
                         threshold=ThresholdRule("quantile", 0.45), assumed_test_spacing=13.1,
                         tta=True)
    cfg.save(tmp_path)
    loaded = PipelineConfig.load(tmp_path)
    assert loaded == cfg
    assert loaded.threshold.kind == "quantile"
    assert not list(tmp_path.glob("*.tmp"))


def test_derived_values():
    cfg = PipelineConfig(stack_half=2, stack_step_angstrom=32.0, target_spacing=16.0)
    assert cfg.in_chans == 5
    assert cfg.stack_step_slices == 2
    assert PipelineConfig(stack_step_angstrom=5.0).stack_step_slices == 1


@pytest.mark.parametrize("field,value,needle", [
    ("target_spacing", 0, "target_spacing"),
    ("percentile_low", 99.0, "percentile_low"),
    ("normalize_per", "tile", "normalize_per"),
    ("output_stride", 3, "output_stride"),
    ("z_stride", 0, "z_stride"),
    ("z_sampling", "cubic", "z_sampling"),
    ("tta", "yes", "tta"),
])
def test_bad_values_are_named(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        PipelineConfig(**{field: value})


def test_other_version_is_refused(tmp_path):
    data = PipelineConfig().to_dict()
    data["version"] = CONFIG_VERSION + 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="version"):
        PipelineConfig.load(tmp_path)


def test_missing_and_corrupt_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        PipelineConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PipelineConfig.load(tmp_path)


def test_a_config_from_before_tta_loads_without_it(tmp_path):
    data = PipelineConfig().to_dict()
    del data["tta"]  # written by a kernel_lib that had no such setting
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert PipelineConfig.load(tmp_path).tta is False


def test_unknown_key_is_refused():
    data = PipelineConfig().to_dict()
    data["mystery"] = 1
    with pytest.raises(ConfigError, match="mystery"):
        PipelineConfig.from_dict(data)


@pytest.mark.parametrize("text,kind,value", [("fixed:0.4", "fixed", 0.4),
                                             ("quantile:0.45", "quantile", 0.45)])
def test_threshold_parse(text, kind, value):
    rule = ThresholdRule.parse(text)
    assert (rule.kind, rule.value) == (kind, value)
    assert ThresholdRule.parse(str(rule)) == rule


@pytest.mark.parametrize("text", ["0.4", "best:0.4", "fixed:2", "fixed:abc"])
def test_threshold_parse_errors(text):
    with pytest.raises(ConfigError):
        ThresholdRule.parse(text)


def test_atomic_write_honours_umask(tmp_path):
    import os
    import stat

    from kernel_lib.config import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.csv", "a\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.csv").stat().st_mode) == 0o644
    assert (tmp_path / "x.csv").read_text() == "a\n"


def test_preprocessing_settings_name_their_cache():
    from kernel_lib.preprocess import preprocessing_key

    base = PipelineConfig()
    assert preprocessing_key(base) == preprocessing_key(base.replace(z_stride=4, encoder="x"))
    for change in ({"z_sampling": "nearest" if base.z_sampling == "area" else "area"},
                   {"target_spacing": 16.0}, {"normalize_per": "slice"}):
        assert preprocessing_key(base.replace(**change)) != preprocessing_key(base), change
