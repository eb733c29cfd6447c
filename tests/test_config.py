"""CheckpointConfig: validation names the field, sizes, YAML loading, NeMo aliases."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_ckpt import CheckpointConfig, ConfigError
from ray_ckpt.config import parse_size

REPO = Path(__file__).resolve().parent.parent

# (field, a bad value) for every validated field.
BAD_VALUES = [
    ("storage_uri", ""),
    ("storage_uri", 3),
    ("run_name", ""),
    ("run_name", "a/b"),
    ("run_name", ".."),
    ("run_name", 7),
    ("metric_name", 1.5),
    ("mode", "maximum"),
    ("mode", None),
    ("keep_top_k", -1),
    ("keep_top_k", "3"),
    ("keep_top_k", True),
    ("keep_last_n", -2),
    ("keep_last_n", 1.0),
    ("keep_period", 0),
    ("keep_period", -5),
    ("save_interval_steps", 0),
    ("save_interval_steps", None),
    ("max_shard_size", 0),
    ("max_shard_size", -1),
    ("max_shard_size", "lots"),
    ("max_shard_size", "5 XB"),
    ("max_shard_size", 1.5),
    ("max_shard_size", True),
    ("async_save", "yes"),
    ("async_save", 1),
    ("checkpoint_format", "pickle"),
    ("verify_on_load", None),
    ("allowed_architecture_prefixes", "ray_ckpt."),
    ("allowed_architecture_prefixes", ["ok.", ""]),
    ("allowed_architecture_prefixes", [3]),
    ("storage_options", ["key", "value"]),
    ("write_mode", "scatter"),
    ("save_timeout_s", 0),
    ("save_timeout_s", float("inf")),
    ("save_timeout_s", float("nan")),
    ("save_timeout_s", "60"),
    ("max_pending_saves", 0),
    ("lease_ttl_s", -1.0),
    ("lease_ttl_s", True),
    ("max_restarts", -2),
    ("remote_uri", 5),
    ("enabled", "true"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_invalid_field_raises_config_error_naming_it(name: str, value: object) -> None:
    with pytest.raises(ConfigError) as excinfo:
        CheckpointConfig(**{name: value})
    assert str(excinfo.value).startswith(f"{name}:"), str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)


def test_defaults_are_valid() -> None:
    cfg = CheckpointConfig()
    assert cfg.max_shard_size == 5 * 10**9  # "5GB" like Hugging Face
    assert cfg.mode == "min"
    assert cfg.checkpoint_format == "safetensors"
    assert cfg.verify_on_load is True
    assert cfg.storage_options == {}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("1GiB", 2**30),
        ("1gib", 2**30),
        ("256KB", 256_000),
        ("64KiB", 65536),
        ("2TB", 2 * 10**12),
        ("1.5GB", 1_500_000_000),
        (" 10 MB ", 10_000_000),
        ("123", 123),
        ("123B", 123),
        (4096, 4096),
        (1, 1),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected  # type: ignore[arg-type]
    assert CheckpointConfig(max_shard_size=value).max_shard_size == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["", "GB", "5 G", "5XB", "-5MB", "0", "0GB", "1e9", None, [5], 2.0, False])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^max_shard_size:"):
        parse_size(value, field_name="max_shard_size")  # type: ignore[arg-type]


def test_valid_values_accepted() -> None:
    cfg = CheckpointConfig(
        storage_uri="s3://bucket/prefix",
        run_name="exp-1.a_b+c=d@e,f",
        metric_name="eval/return",
        mode="max",
        keep_top_k=0,
        keep_last_n=0,
        keep_period=1,
        save_interval_steps=1,
        max_shard_size="1GiB",
        async_save=True,
        checkpoint_format="pt",
        verify_on_load=False,
        allowed_architecture_prefixes=("ray_ckpt.", "tests."),
        storage_options={"anon": True},
        write_mode="direct",
        save_timeout_s=1,
        lease_ttl_s=0.5,
        max_restarts=-1,
        remote_uri="s3://b/p",
        enabled=False,
    )
    assert cfg.allowed_architecture_prefixes == ["ray_ckpt.", "tests."]
    assert cfg.max_shard_size == 2**30
    assert cfg.remote_checkpoints_enabled


def test_replace_revalidates() -> None:
    cfg = CheckpointConfig()
    assert cfg.replace(keep_top_k=2).keep_top_k == 2
    with pytest.raises(ConfigError, match=r"^keep_top_k:"):
        cfg.replace(keep_top_k=-1)


def test_to_dict_round_trips() -> None:
    cfg = CheckpointConfig(metric_name="loss", keep_top_k=2, max_shard_size="1MB", storage_options={"a": 1})
    again = CheckpointConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_from_yaml_example_config() -> None:
    cfg = CheckpointConfig.from_yaml(REPO / "configs" / "example.yaml")
    assert cfg.run_name == "demo"
    assert cfg.storage_uri == "./demo_runs"
    assert cfg.metric_name == "eval/return"
    assert cfg.mode == "max"
    assert (cfg.keep_top_k, cfg.keep_last_n, cfg.keep_period) == (3, 2, 10)
    assert cfg.save_interval_steps == 2
    assert cfg.max_shard_size == 256_000
    assert cfg.async_save is True
    assert cfg.checkpoint_format == "safetensors"
    assert cfg.allowed_architecture_prefixes == ["ray_ckpt."]
    assert cfg.storage_options == {}


def test_from_yaml_top_level_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run_name: top\nkeep_top_k: 4\nmax_shard_size: 500MB\n")
    cfg = CheckpointConfig.from_yaml(path)
    assert (cfg.run_name, cfg.keep_top_k, cfg.max_shard_size) == ("top", 4, 500 * 10**6)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert CheckpointConfig.from_yaml(empty) == CheckpointConfig()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("checkpoint:\n  mode: best\n", "mode"),
        ("checkpoint:\n  keep_top_k: three\n", "keep_top_k"),
        ("checkpoint:\n  max_shard_size: 5 gigs\n", "max_shard_size"),
        ("checkpoint:\n  async_save: maybe\n", "async_save"),
        ("checkpoint:\n  run_name: ../escape\n", "run_name"),
        ("checkpoint:\n  storage_options: [1, 2]\n", "storage_options"),
        ("checkpoint:\n  save_timeout_s: -3\n", "save_timeout_s"),
        ("checkpoint:\n  higher_is_better: 1\n", "higher_is_better"),
    ],
)
def test_from_yaml_invalid_values_name_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as excinfo:
        CheckpointConfig.from_yaml(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert f"{field}:" in message


def test_from_yaml_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("checkpoint:\n  keep_top_kk: 3\n")
    with pytest.raises(ConfigError, match=r"keep_top_kk: unknown config field"):
        CheckpointConfig.from_yaml(path)


def test_from_yaml_broken_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("checkpoint: [unclosed\n  mode: max\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        CheckpointConfig.from_yaml(path)


def test_from_yaml_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        CheckpointConfig.from_yaml(path)


def test_from_dict_unknown_key_names_it() -> None:
    with pytest.raises(ConfigError, match=r"^bogus: unknown config field"):
        CheckpointConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="expected a mapping"):
        CheckpointConfig.from_dict(["run_name"])  # type: ignore[arg-type]


def test_nemo_aliases() -> None:
    cfg = CheckpointConfig.from_dict(
        {"checkpoint_dir": "/tmp/ckpts", "higher_is_better": True, "save_period": 5, "metric_name": "val:acc",
         "keep_top_k": 2, "enabled": True}
    )
    assert cfg.storage_uri == "/tmp/ckpts"
    assert cfg.mode == "max"
    assert cfg.save_interval_steps == 5
    assert CheckpointConfig.from_dict({"higher_is_better": False}).mode == "min"


def test_nemo_aliases_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "nemo.yaml"
    path.write_text("checkpoint:\n  checkpoint_dir: results/x\n  higher_is_better: false\n  save_period: 10\n")
    cfg = CheckpointConfig.from_yaml(path)
    assert (cfg.storage_uri, cfg.mode, cfg.save_interval_steps) == ("results/x", "min", 10)


def test_alias_errors_name_the_target_field() -> None:
    with pytest.raises(ConfigError, match=r"^save_interval_steps:"):
        CheckpointConfig.from_dict({"save_period": 0})


@pytest.mark.parametrize(
    "data",
    [
        {"checkpoint_dir": "/a", "storage_uri": "/b"},
        {"higher_is_better": True, "mode": "min"},
        {"save_period": 2, "save_interval_steps": 3},
    ],
)
def test_alias_conflicting_with_its_field_is_refused(data: dict) -> None:
    with pytest.raises(ConfigError) as excinfo:
        CheckpointConfig.from_dict(data)
    for key in data:
        assert key in str(excinfo.value)
