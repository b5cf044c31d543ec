"""Service configs: CLI round trips, flag names, validation naming the field, and --help docs."""

from __future__ import annotations

import dataclasses

import pytest

from mmserve.config import ServiceConfig, option
from services.decoder.config import DecoderConfig
from services.encoder.config import EncoderConfig
from services.llm.config import LlmConfig
from services.router.config import RouterConfig

REQUIRED = {
    DecoderConfig: {},
    EncoderConfig: {"model": "/models/tiny"},
    LlmConfig: {"model": "/models/tiny"},
    RouterConfig: {"model": "/models/tiny", "decoder_addrs": "127.0.0.1:5001", "encoder_addrs": "127.0.0.1:5002",
                   "llm_addrs": "127.0.0.1:5003,127.0.0.1:5004"},
}
CONFIGS = list(REQUIRED)
# Valid values different from every default, for the string fields that are checked.
STRINGS = {"dtype": "bfloat16", "log_level": "DEBUG", "host": "0.0.0.0", "redis_url": "redis://10.0.0.1:6380/2",
           "media_root": "/srv/media files", "policy": "fcfs", "registry_url": "redis://10.0.0.2:6379/1",
           "advertise_address": "decoder-3.internal:50061", "device": "cpu",
           "flex_addrs": "127.0.0.1:5101/127.0.0.1:5102", "unified_addrs": "127.0.0.1:5201/127.0.0.1:5202"}
BOUNDED = {"admission_target": 0.8}  # numbers whose default + 0.1 is out of range


def make(cls, **overrides):
    return cls(**(REQUIRED[cls] | overrides))


def non_default(cls):
    """A valid config of cls in which every field differs from its default."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in BOUNDED:
            values[f.name] = BOUNDED[f.name]
        elif isinstance(f.default, bool):
            values[f.name] = not f.default
        elif isinstance(f.default, int):
            values[f.name] = f.default + 7
        elif isinstance(f.default, float):
            values[f.name] = f.default + 0.1  # 0.1 is not exact in binary: checks repr round trips
        else:
            values[f.name] = STRINGS.get(f.name, REQUIRED[cls].get(f.name, f"{f.name}-value"))
    config = cls(**values)
    assert all(getattr(config, f.name) != f.default for f in dataclasses.fields(cls))
    return config


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_round_trip_of_a_minimal_config(cls):
    config = make(cls)
    assert cls.parse(config.to_argv()) == config


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_round_trip_with_every_field_changed(cls):
    config = non_default(cls)
    assert cls.parse(config.to_argv()) == config


def test_parse_of_only_the_required_flags_gives_the_defaults():
    assert LlmConfig.parse(["--model", "/m"]) == LlmConfig(model="/m")
    assert DecoderConfig.parse([]) == DecoderConfig()


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_flags_are_field_names_with_dashes(cls):
    argv = make(cls).to_argv()
    flags = [a for a in argv if a.startswith("--")]
    config = make(cls)
    assert flags == [("--" if getattr(config, f.name) is not False else "--no-") + f.name.replace("_", "-")
                     for f in dataclasses.fields(cls)]


def test_named_flags_parse_into_their_fields():
    config = LlmConfig.parse(["--model", "/m", "--max-num-seqs", "3", "--max-num-batched-tokens", "512",
                              "--grace-s", "1.5", "--dtype", "float16"])
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.grace_s, config.dtype) == (3, 512, 1.5,
                                                                                                  "float16")
    assert isinstance(config.grace_s, float) and isinstance(config.max_num_seqs, int)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_with_flags_changes_only_the_flags_given(cls):
    config = non_default(cls)
    assert config.with_flags([]) == config
    changed = config.with_flags(["--log-level", "ERROR", "--grace-s", "9.5", "--grace-s", "2.5"])
    assert changed == dataclasses.replace(config, log_level="ERROR", grace_s=2.5)  # the last occurrence wins


@dataclasses.dataclass(frozen=True)
class _WithFlag(ServiceConfig):
    """A config with a boolean field."""

    enabled: bool = option(True, "turns the feature on")


@pytest.mark.parametrize("enabled", [True, False])
def test_boolean_fields_use_flag_and_no_flag(enabled):
    config = _WithFlag(enabled=enabled)
    argv = config.to_argv()
    assert ("--enabled" if enabled else "--no-enabled") in argv
    assert _WithFlag.parse(argv) == config


INVALID = [
    (LlmConfig, {"model": ""}, "model"),
    (LlmConfig, {"dtype": "int8"}, "dtype"),
    (LlmConfig, {"max_num_seqs": 0}, "max_num_seqs"),
    (LlmConfig, {"block_size": -1}, "block_size"),
    (EncoderConfig, {"model": ""}, "model"),
    (EncoderConfig, {"dtype": "fp32"}, "dtype"),
    (EncoderConfig, {"max_batch_patches": 0}, "max_batch_patches"),
    (DecoderConfig, {"ffmpeg_threads": 0}, "ffmpeg_threads"),
    (DecoderConfig, {"max_media_bytes": 0}, "max_media_bytes"),
    (RouterConfig, {"model": ""}, "model"),
    (RouterConfig, {"decoder_addrs": ""}, "decoder_addrs"),
    (RouterConfig, {"encoder_addrs": ""}, "encoder_addrs"),
    (RouterConfig, {"llm_addrs": ""}, "llm_addrs"),
    (RouterConfig, {"admission_probe_after_s": -1}, "admission_probe_after_s"),
    (DecoderConfig, {"port": 65536}, "port"),
    (DecoderConfig, {"port": -1}, "port"),
    (LlmConfig, {"metrics_port": 70000}, "port"),
    (RouterConfig, {"max_message_bytes": 1024}, "max_message_bytes"),
    (EncoderConfig, {"max_concurrent_rpcs": 0}, "max_concurrent_rpcs"),
    (LlmConfig, {"nice": -1}, "nice"),  # raising a priority takes privileges a service should not have
    (DecoderConfig, {"nice": 20}, "nice"),
]


@pytest.mark.parametrize("cls, overrides, field", INVALID, ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_invalid_value_names_the_field(cls, overrides, field):
    with pytest.raises(ValueError, match=field):
        make(cls, **overrides)


def test_invalid_value_on_the_command_line_names_the_field():
    with pytest.raises(ValueError, match="max_num_seqs"):
        LlmConfig.parse(["--model", "/m", "--max-num-seqs", "0"])


def test_unparsable_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        LlmConfig.parse(["--model", "/m", "--max-num-seqs", "many"])
    assert info.value.code == 2
    assert "--max-num-seqs" in capsys.readouterr().err


@pytest.mark.parametrize("cls, overrides", [
    (LlmConfig, {"max_model_len": 0}),
    (LlmConfig, {"kv_cache_bytes": 0}),
    (LlmConfig, {"num_threads": -1}),
    (EncoderConfig, {"num_threads": -1}),
    (RouterConfig, {"max_tokens_limit": 0}),
    (RouterConfig, {"max_messages": 0}),
    (RouterConfig, {"request_timeout_s": 0.0}),
    (RouterConfig, {"cache_ttl_s": 0}),
    (RouterConfig, {"cache_timeout_ms": -1}),
    (DecoderConfig, {"grace_s": -1.0}),
], ids=lambda v: v.__name__ if isinstance(v, type) else next(iter(v)))
def test_fields_reject_nonsense(cls, overrides):
    with pytest.raises(ValueError, match=next(iter(overrides))):
        make(cls, **overrides)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_help_shows_every_fields_doc(cls, capsys):
    with pytest.raises(SystemExit) as info:
        cls.parse(["--help"])
    assert info.value.code == 0
    # argparse wraps help lines (and may break at hyphens), so compare without whitespace.
    help_text = "".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(cls):
        doc = f.metadata["doc"]
        assert doc, f"{cls.__name__}.{f.name} has no doc"
        assert "".join(doc.split()) in help_text, f.name
        assert "--" + f.name.replace("_", "-") in help_text
    assert "".join(cls.__doc__.split()) in help_text
