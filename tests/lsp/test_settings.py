"""Settings: typed struct from initializationOptions / didChangeConfiguration, bad fields named."""

from lsp_server.settings import Settings, parse_settings


def test_defaults_when_nothing_given():
    settings, warnings = parse_settings(None)
    assert settings == Settings()
    assert warnings == []


def test_camel_case_keys_are_read():
    settings, warnings = parse_settings(
        {"maxTokens": 12, "debounceMinMs": 10, "stopMode": "line", "languages": ["python"]}
    )
    assert (settings.max_tokens, settings.debounce_min_ms, settings.stop_mode) == (12, 10, "line")
    assert settings.serves("python") and not settings.serves("rust")
    assert warnings == []


def test_section_nested_under_maskfill_is_unwrapped():
    settings, _ = parse_settings({"maskfill": {"device": "cuda:1", "quant": "int8"}})
    assert (settings.device, settings.quant) == ("cuda:1", "int8")


def test_bad_field_is_named_and_falls_back_to_its_default_only():
    settings, warnings = parse_settings({"maxTokens": "many", "device": "cuda"})
    assert settings.max_tokens == Settings().max_tokens
    assert settings.device == "cuda"  # the good field survives
    assert len(warnings) == 1 and "`maxTokens`" in warnings[0]


def test_out_of_range_and_bad_enum_values_are_rejected():
    settings, warnings = parse_settings({"maxTokens": 0, "quant": "int3", "device": "tpu"})
    assert (settings.max_tokens, settings.quant, settings.device) == (32, "none", "cpu")
    named = " ".join(warnings)
    assert "`maxTokens`" in named and "`quant`" in named and "`device`" in named


def test_unknown_field_is_named():
    settings, warnings = parse_settings({"maxTokenz": 5})
    assert settings == Settings()
    assert warnings == ["maskfill setting `maxTokenz` is unknown; ignored"]


def test_partial_update_keeps_the_current_values():
    current, _ = parse_settings({"maxTokens": 20, "device": "cuda"})
    updated, _ = parse_settings({"stopMode": "block"}, base=current)
    assert (updated.max_tokens, updated.device, updated.stop_mode) == (20, "cuda", "block")


def test_non_object_is_ignored_with_a_warning():
    settings, warnings = parse_settings(["not", "an", "object"])
    assert settings == Settings()
    assert "must be an object" in warnings[0]
