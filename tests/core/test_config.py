"""CheckpointConfig: validation names the field, every error at once, groups, YAML, NeMo and Ray
aliases, assignment, the JSON schema, and entry points refusing fields they ignore."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

import ray_ckpt.distributed.handle  # noqa: F401  (defines start_checkpointer: registers its CONSUMERS entry)
from ray_ckpt import CheckpointConfig, CheckpointStore, ConfigError, open_store
from ray_ckpt.core.config import CONSUMERS, FIELD_GROUPS, GROUPS, RetentionOptions, parse_size
from ray_ckpt.distributed.ray_config import retention_from_ray

REPO = Path(__file__).resolve().parents[2]

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
    ("leftover_grace_s", -1),
    ("leftover_grace_s", float("nan")),
    ("keep_checkpoints_without_metrics", "no"),
    ("remote_storage_options", ["key", "value"]),
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
        remote_storage_options={"anon": False},
        keep_checkpoints_without_metrics=True,
        enabled=False,
    )
    assert cfg.allowed_architecture_prefixes == ["ray_ckpt.", "tests."]
    assert cfg.max_shard_size == 2**30
    assert cfg.remote_checkpoints_enabled


def test_replace_revalidates() -> None:
    cfg = CheckpointConfig(metric_name="loss")
    assert cfg.replace(keep_top_k=2).keep_top_k == 2
    with pytest.raises(ConfigError, match=r"^keep_top_k:"):
        cfg.replace(keep_top_k=-1)
    assert cfg.keep_top_k is None  # the original is untouched


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
    assert cfg.async_save is False  # the demo starts a checkpointer, which ignores async_save
    assert cfg.checkpoint_format == "safetensors"
    assert cfg.allowed_architecture_prefixes == ["ray_ckpt."]
    assert cfg.storage_options == {}
    assert (cfg.write_mode, cfg.save_timeout_s, cfg.lease_ttl_s) == ("gather", 60.0, 30.0)
    assert cfg.retention.keep_top_k == 3 and cfg.store.run_name == "demo"
    cfg.check_consumed("start_checkpointer")  # what the demo does with it


def test_from_yaml_top_level_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run_name: top\nmetric_name: loss\nkeep_top_k: 4\nmax_shard_size: 500MB\n")
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
        {
            "checkpoint_dir": "/tmp/ckpts",
            "higher_is_better": True,
            "save_period": 5,
            "metric_name": "val:acc",
            "keep_top_k": 2,
            "enabled": True,
        }
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


# Ray Train/Tune's CheckpointConfig names, with Ray's meaning of num_to_keep.
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"num_to_keep": 2}, {"keep_last_n": 2, "keep_top_k": None, "metric_name": None, "mode": "min"}),
        (
            {"num_to_keep": 2, "checkpoint_score_attribute": "loss", "checkpoint_score_order": "min"},
            {"keep_last_n": None, "keep_top_k": 2, "metric_name": "loss", "mode": "min"},
        ),
        # a score attribute without an order ranks by Ray's default order, max
        ({"num_to_keep": 1, "checkpoint_score_attribute": "acc"}, {"keep_top_k": 1, "mode": "max"}),
        ({"checkpoint_score_attribute": "acc", "mode": "min"}, {"keep_top_k": None, "mode": "min"}),
        ({"num_to_keep": None, "checkpoint_score_attribute": None}, {"keep_last_n": None, "metric_name": None}),
        ({"num_to_keep": 3, "metric_name": "loss"}, {"keep_last_n": 3, "keep_top_k": None, "metric_name": "loss"}),
    ],
)
def test_ray_checkpoint_config_names_are_accepted(data: dict, expected: dict) -> None:
    cfg = CheckpointConfig.from_dict(data)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert CheckpointConfig(**data) == cfg


def test_ray_names_from_yaml_and_their_errors(tmp_path: Path) -> None:
    path = tmp_path / "ray.yaml"
    path.write_text(
        "checkpoint:\n  num_to_keep: 2\n  checkpoint_score_attribute: loss\n  checkpoint_score_order: min\n"
    )
    cfg = CheckpointConfig.from_yaml(path)
    assert (cfg.keep_top_k, cfg.metric_name, cfg.mode) == (2, "loss", "min")
    with pytest.raises(ConfigError, match=r"^mode: must be 'max' or 'min', got 'up' \(given as checkpoint_score_order"):
        CheckpointConfig(checkpoint_score_order="up")
    with pytest.raises(ConfigError, match=r"^num_to_keep: must be None or at least 1"):
        CheckpointConfig(num_to_keep=0)
    with pytest.raises(ConfigError, match=r"^keep_last_n: given twice, as num_to_keep=2 and keep_last_n=3"):
        CheckpointConfig(num_to_keep=2, keep_last_n=3)
    with pytest.raises(ConfigError, match=r"^mode: given twice"):
        CheckpointConfig(checkpoint_score_attribute="a", checkpoint_score_order="max", mode="min")
    with pytest.raises(ConfigError, match="did you mean num_to_keep"):
        CheckpointConfig(num_to_kep=2)
    # an entry point that ignores retention names the field the Ray name set
    cfg = CheckpointConfig(num_to_keep=2)
    with pytest.raises(ConfigError, match=r"^keep_last_n: set to 2, but x ignores it"):
        cfg.check_consumed("x", consumed={"store"}, among=["num_to_keep"])


def test_retention_from_ray_checkpoint_config() -> None:
    ray_train = pytest.importorskip("ray.train")
    ranked = ray_train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="loss", checkpoint_score_order="min")
    assert retention_from_ray(ranked) == {"keep_top_k": 2, "metric_name": "loss", "mode": "min"}
    assert retention_from_ray(ray_train.CheckpointConfig(num_to_keep=3)) == {"keep_last_n": 3}
    assert retention_from_ray(ray_train.CheckpointConfig()) == {}  # Ray keeps everything: no rule
    assert retention_from_ray({"num_to_keep": 1, "checkpoint_at_end": True}) == {"keep_last_n": 1}
    cfg = CheckpointConfig(storage_uri="/x", **retention_from_ray(ranked))
    assert (cfg.keep_top_k, cfg.metric_name, cfg.mode) == (2, "loss", "min")
    with pytest.raises(ConfigError, match="not a Ray CheckpointConfig retention field"):
        retention_from_ray({"keep_last_n": 1})
    with pytest.raises(ConfigError, match="expected a ray.train.CheckpointConfig"):
        retention_from_ray(3)


# ---------------------------------------------------------------------------------------------
# Groups: flat and grouped input, grouped access.
# ---------------------------------------------------------------------------------------------
def test_flat_and_grouped_construction_are_the_same_config() -> None:
    flat = CheckpointConfig(
        storage_uri="/data",
        metric_name="loss",
        keep_top_k=3,
        write_mode="direct",
        max_shard_size="1MB",
        remote_uri="s3://b/p",
    )
    grouped = CheckpointConfig(
        store={"storage_uri": "/data", "max_shard_size": "1MB"},
        retention={"metric_name": "loss", "keep_top_k": 3},
        checkpointer={"write_mode": "direct"},
        tiering={"remote_uri": "s3://b/p"},
    )
    mixed = CheckpointConfig(
        storage_uri="/data",
        max_shard_size=10**6,
        retention=RetentionOptions(metric_name="loss", keep_top_k=3),
        checkpointer={"write_mode": "direct"},
        remote_uri="s3://b/p",
    )
    assert flat == grouped == mixed
    assert flat.retention.keep_top_k == flat.keep_top_k == 3
    assert flat.store.max_shard_size == flat.max_shard_size == 10**6
    assert flat.checkpointer.write_mode == "direct" and flat.tiering.remote_uri == "s3://b/p"
    assert set(FIELD_GROUPS) == set(flat.to_dict())
    assert CheckpointConfig.from_dict(flat.to_grouped_dict()) == flat


def test_a_group_instance_is_copied_not_shared() -> None:
    retention = RetentionOptions(metric_name="loss", keep_top_k=1)
    cfg = CheckpointConfig(retention=retention)
    retention.keep_top_k = 5
    assert cfg.keep_top_k == 1


def test_grouped_yaml(tmp_path: Path) -> None:
    path = tmp_path / "grouped.yaml"
    path.write_text(
        "checkpoint:\n"
        "  store:\n    run_name: g\n    max_shard_size: 2MB\n"
        "  retention:\n    metric_name: loss\n    keep_top_k: 2\n"
        "  schedule:\n  checkpointer:\n    save_timeout_s: 5\n"
        "  keep_last_n: 4\n"  # flat keys mix with the group sections
    )
    cfg = CheckpointConfig.from_yaml(path)
    assert (cfg.run_name, cfg.max_shard_size, cfg.keep_top_k, cfg.keep_last_n) == ("g", 2 * 10**6, 2, 4)
    assert cfg.save_timeout_s == 5.0 and cfg.save_interval_steps == 1


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        (
            {"keep_top_k": 3, "retention": {"keep_top_k": 4, "metric_name": "m"}},
            ["keep_top_k: given twice", "keep_top_k=3", "retention.keep_top_k=4"],
        ),
        ({"store": {"keep_top_k": 3}}, ["store.keep_top_k:", "retention group"]),
        ({"retention": [1]}, ["retention: expected a mapping"]),
        ({"retention": {"keep_top": 3}}, ["retention.keep_top:", "did you mean keep_top_k"]),
        (
            {"save_period": 2, "schedule": {"save_interval_steps": 3}},
            ["save_interval_steps: given twice", "save_period=2", "schedule.save_interval_steps=3"],
        ),
    ],
)
def test_group_input_problems_name_the_key(data: dict, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        CheckpointConfig.from_dict(data)
    for needle in needles:
        assert needle in str(excinfo.value), str(excinfo.value)


def test_replace_merges_a_group_mapping() -> None:
    cfg = CheckpointConfig(metric_name="loss", keep_top_k=2, keep_last_n=1)
    again = cfg.replace(retention={"keep_top_k": 5}, write_mode="direct")
    assert (again.keep_top_k, again.keep_last_n, again.metric_name, again.write_mode) == (5, 1, "loss", "direct")
    assert cfg.keep_top_k == 2 and cfg.write_mode == "gather"
    with pytest.raises(ConfigError, match="did you mean keep_top_k"):
        cfg.replace(keep_top=1)


# ---------------------------------------------------------------------------------------------
# Every error at once, did-you-mean.
# ---------------------------------------------------------------------------------------------
def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as excinfo:
        CheckpointConfig(mode="best", keep_top_k=-1, run_name="a/b")
    message = str(excinfo.value)
    assert message.startswith("3 configuration errors:"), message
    for field in ("mode:", "keep_top_k:", "run_name:"):
        assert field in message, message
    assert sorted(f for f, _ in excinfo.value.problems) == ["keep_top_k", "mode", "run_name"]  # type: ignore[attr-defined]


def test_every_error_at_once_across_groups_and_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "checkpoint:\n  keep_top: 3\n  mode: best\n  checkpointer:\n    write_mode: scatter\n"
        "  store:\n    max_shard_size: lots\n"
    )
    with pytest.raises(ConfigError) as excinfo:
        CheckpointConfig.from_yaml(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: 4 configuration errors:"), message
    unknown = "keep_top: unknown config field; did you mean keep_top_k?"
    for needle in (unknown, "mode:", "write_mode:", "max_shard_size:"):
        assert needle in message, message


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("keep_top", "keep_top_k"),
        ("metric", "metric_name"),
        ("storage_option", "storage_options"),
        ("retension", "retention"),
    ],
)
def test_unknown_key_says_did_you_mean(typo: str, meant: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{typo}: unknown config field; did you mean {meant}\?"):
        CheckpointConfig(**{typo: 3})


def test_unknown_key_without_a_close_match_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"^zzz: unknown config field \(known: .*keep_top_k"):
        CheckpointConfig.from_dict({"zzz": 1})


def test_attribute_typo_says_did_you_mean() -> None:
    cfg = CheckpointConfig()
    with pytest.raises(AttributeError, match="did you mean 'keep_top_k'"):
        cfg.keep_top  # noqa: B018
    with pytest.raises(ConfigError, match="did you mean keep_top_k"):
        cfg.keep_top = 3


def test_alias_errors_say_which_key_was_given() -> None:
    with pytest.raises(ConfigError, match=r"^save_interval_steps: .*\(given as save_period\)"):
        CheckpointConfig.from_dict({"save_period": 0})


# ---------------------------------------------------------------------------------------------
# Cross-field rules.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 3])
def test_keep_top_k_without_metric_name_is_an_error(k: int) -> None:
    with pytest.raises(ConfigError, match=r"^keep_top_k: set without metric_name"):
        CheckpointConfig(keep_top_k=k)
    assert CheckpointConfig(keep_top_k=k, metric_name="loss").keep_top_k == k


def test_keep_top_k_without_metric_name_from_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("checkpoint:\n  retention:\n    keep_top_k: 2\n")
    with pytest.raises(ConfigError, match=rf"^{path}: keep_top_k: set without metric_name"):
        CheckpointConfig.from_yaml(path)


def test_keep_top_k_without_metric_name_is_refused_by_the_store(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^keep_top_k:"):
        CheckpointStore(str(tmp_path), run_name="r", keep_top_k=2)


def test_keep_checkpoints_without_metrics() -> None:
    # Our default is False (Orbax's is True): a step without a finite metric is never best and is
    # kept only by the other rules (docs/RETENTION.md says why).
    assert CheckpointConfig().keep_checkpoints_without_metrics is False
    cfg = CheckpointConfig(metric_name="loss", keep_top_k=2, keep_checkpoints_without_metrics=True)
    assert cfg.retention.keep_checkpoints_without_metrics is True
    assert CheckpointConfig(keep_last_n=2, keep_checkpoints_without_metrics=False).keep_last_n == 2  # the default
    with pytest.raises(ConfigError, match=r"^keep_checkpoints_without_metrics: True only changes what keep_top_k"):
        CheckpointConfig(metric_name="loss", keep_last_n=2, keep_checkpoints_without_metrics=True)
    with pytest.raises(ConfigError, match=r"^keep_checkpoints_without_metrics:"):
        cfg.replace(keep_top_k=None)


def test_remote_storage_options_need_remote_uri() -> None:
    with pytest.raises(ConfigError, match=r"^remote_storage_options: set without remote_uri"):
        CheckpointConfig(remote_storage_options={"anon": True})
    cfg = CheckpointConfig(remote_uri="s3://b/p", remote_storage_options={"anon": True})
    assert cfg.tiering.remote_storage_options == {"anon": True} and cfg.remote_checkpoints_enabled


# ---------------------------------------------------------------------------------------------
# Validation on assignment.
# ---------------------------------------------------------------------------------------------
def test_assignment_is_validated() -> None:
    cfg = CheckpointConfig(metric_name="loss")
    cfg.keep_top_k = 2
    cfg.max_shard_size = "1MB"
    assert (cfg.keep_top_k, cfg.retention.keep_top_k, cfg.max_shard_size) == (2, 2, 10**6)
    with pytest.raises(ConfigError, match=r"^keep_top_k: must be greater than or equal to 0, got -1"):
        cfg.keep_top_k = -1
    with pytest.raises(ConfigError, match=r"^keep_top_k:"):
        cfg.retention.keep_top_k = "3"
    with pytest.raises(ConfigError, match=r"^run_name:"):
        cfg.run_name = "../x"
    with pytest.raises(ConfigError, match=r"^max_shard_size:"):
        cfg.store.max_shard_size = "lots"
    assert (cfg.keep_top_k, cfg.run_name, cfg.max_shard_size) == (2, "run", 10**6)  # nothing half-applied


def test_assignment_checks_the_cross_field_rules_and_rolls_back() -> None:
    cfg = CheckpointConfig(metric_name="loss", keep_top_k=2)
    with pytest.raises(ConfigError, match=r"^keep_top_k: set without metric_name"):
        cfg.metric_name = None
    assert cfg.metric_name == "loss" and cfg == CheckpointConfig(metric_name="loss", keep_top_k=2)
    with pytest.raises(ConfigError, match=r"^keep_top_k:"):
        cfg.retention = {"keep_top_k": 1}
    cfg.retention = {"metric_name": "reward", "mode": "max"}
    assert (cfg.metric_name, cfg.mode, cfg.keep_top_k) == ("reward", "max", None)


# ---------------------------------------------------------------------------------------------
# JSON schema, pickling.
# ---------------------------------------------------------------------------------------------
def test_json_schema_lists_every_field_with_its_group_and_description() -> None:
    schema = CheckpointConfig.json_schema()
    assert set(schema["properties"]) == set(GROUPS)
    seen = set()
    for group, prop in schema["properties"].items():
        ref = prop.get("$ref") or prop["allOf"][0]["$ref"]
        definition = schema["$defs"][ref.rsplit("/", 1)[-1]]
        assert definition.get("additionalProperties") is False
        assert set(definition["properties"]) == {f for f, g in FIELD_GROUPS.items() if g == group}
        for name, field in definition["properties"].items():
            assert field.get("description"), f"{group}.{name} has no description"
            seen.add(name)
    assert seen == set(FIELD_GROUPS)
    size = schema["$defs"]["StoreOptions"]["properties"]["max_shard_size"]
    assert {t.get("type") for t in size["anyOf"]} == {"integer", "string"}  # "5GB" is valid input


@pytest.mark.parametrize("dumps", ["pickle", "cloudpickle"])
def test_pickle_round_trip(dumps: str) -> None:
    cfg = CheckpointConfig(
        storage_uri="s3://b/p",
        metric_name="loss",
        keep_top_k=2,
        write_mode="direct",
        storage_options={"anon": True},
        remote_uri="s3://b/q",
        remote_storage_options={"x": 1},
    )
    if dumps == "pickle":
        again = pickle.loads(pickle.dumps(cfg))
    else:
        from ray import cloudpickle

        again = cloudpickle.loads(cloudpickle.dumps(cfg))
    assert again == cfg and again.keep_top_k == 2 and again.retention.metric_name == "loss"
    with pytest.raises(ConfigError):
        again.keep_top_k = -1  # still validated after the trip
    assert again.replace(keep_top_k=3).keep_top_k == 3


# ---------------------------------------------------------------------------------------------
# A field set where the entry point ignores it is an error.
# ---------------------------------------------------------------------------------------------
def test_unused_fields() -> None:
    cfg = CheckpointConfig(metric_name="loss", keep_top_k=2, write_mode="direct", async_save=True)
    assert cfg.non_default_fields() == {
        "metric_name": "loss",
        "keep_top_k": 2,
        "write_mode": "direct",
        "async_save": True,
    }
    assert sorted(cfg.unused_fields(CONSUMERS["CheckpointStore"])) == ["async_save", "write_mode"]
    assert cfg.unused_fields(["store", "retention", "checkpointer", "async_save"]) == []
    with pytest.raises(ValueError, match="unknown groups or fields"):
        cfg.unused_fields(["stor"])


def test_the_manager_refuses_a_field_it_ignores(tmp_path: Path) -> None:
    from ray_ckpt import CheckpointManager

    with pytest.raises(ConfigError) as excinfo:
        CheckpointManager(str(tmp_path / "r"), config=CheckpointConfig(write_mode="direct", lease_ttl_s=5))
    message = str(excinfo.value)
    assert "write_mode: set to 'direct', but CheckpointManager ignores it" in message
    assert "lease_ttl_s:" in message
    assert not (tmp_path / "r").exists()


def test_the_manager_refuses_a_config_value_its_arguments_replace(tmp_path: Path) -> None:
    from ray_ckpt import CheckpointManager

    with pytest.raises(
        ConfigError,
        match=r"^keep_last_n: set to 3, but CheckpointManager takes it from its argument "
        r"max_to_keep \(5\)",
    ):
        CheckpointManager(str(tmp_path / "r"), config=CheckpointConfig(keep_last_n=3))
    # the same value, or the same place spelled differently, is fine; the other store options are used
    cfg = CheckpointConfig(storage_uri=str(tmp_path), keep_last_n=5, max_shard_size="1MB", checkpoint_format="pt")
    with CheckpointManager(str(tmp_path / "r"), config=cfg) as mgr:
        assert (mgr.store.config.max_shard_size, mgr.store.config.checkpoint_format) == (10**6, "pt")
        assert mgr.store.config.keep_last_n == 5 and mgr.store.config.async_save is True


def test_start_checkpointer_refuses_async_save_before_starting_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray_ckpt
    from ray_ckpt.distributed import handle

    def no_actor(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an actor was started")

    monkeypatch.setattr(handle.ray, "remote", no_actor)
    with pytest.raises(ConfigError, match=r"^async_save: set to True, but start_checkpointer ignores it"):
        ray_ckpt.start_checkpointer(CheckpointConfig(async_save=True))
    with pytest.raises(ConfigError, match=r"^enabled:"):
        ray_ckpt.start_checkpointer(CheckpointConfig(enabled=False))


def test_the_checkpointer_consumes_what_its_clients_receive() -> None:
    # WorkerClient/EvalClient get the checkpointer's whole config: every field it accepts, and
    # the save interval a training loop reads (the demo), must pass its check.
    cfg = CheckpointConfig(
        metric_name="loss",
        keep_top_k=2,
        write_mode="direct",
        save_timeout_s=5,
        lease_ttl_s=9,
        max_restarts=0,
        max_pending_saves=1,
        save_interval_steps=4,
        remote_uri="s3://b/p",
    )
    cfg.check_consumed("start_checkpointer")
    open_store(cfg)  # the store opened from it inside the actor and the clients


def test_check_consumed_among_limits_it_to_the_given_fields() -> None:
    cfg = CheckpointConfig(write_mode="direct", async_save=True)
    cfg.check_consumed("CheckpointStore", among=["max_shard_size"])
    cfg.check_consumed("CheckpointStore", among=["remote_uri"])  # the store uploads through its tier
    with pytest.raises(ConfigError) as excinfo:
        cfg.check_consumed("CheckpointStore", among=["write_mode"])
    assert "write_mode" in str(excinfo.value) and "async_save" not in str(excinfo.value)
    with pytest.raises(ValueError, match="no consumer named"):
        cfg.check_consumed("Nobody")


def test_messages_show_storage_options_by_their_keys_only(tmp_path: Path) -> None:
    from ray_ckpt import CheckpointManager

    with pytest.raises(ConfigError) as excinfo:
        CheckpointManager(
            str(tmp_path / "r"),
            storage_options={"key": "AKIA-NEW"},
            config=CheckpointConfig(storage_options={"secret": "hunter2"}),
        )
    message = str(excinfo.value)
    assert "storage_options:" in message and "'secret'" in message
    assert "hunter2" not in message and "AKIA-NEW" not in message


def test_an_old_run_with_keep_top_k_and_no_metric_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs written before keep_top_k needed a metric_name record that policy; readers keep what
    # their writer kept (the latest plus the other rules) instead of refusing the run.
    import torch

    from ray_ckpt.interop import artifact

    store = CheckpointStore(str(tmp_path), run_name="old")
    for step in (1, 2, 3):
        store.save(step, {"w": torch.ones(1)})
    old_policy = {"metric_name": None, "mode": "min", "keep_top_k": 2, "keep_last_n": None, "keep_period": None}
    monkeypatch.setattr(artifact, "recorded_policy", lambda _store: dict(old_policy))
    opened = artifact.open_run(f"{tmp_path}/old")
    assert (opened.config.keep_top_k, opened.config.keep_last_n) == (None, 0)
    assert opened.retention_plan() == ([3], [1, 2])
    with pytest.raises(ConfigError, match=r"keep_top_k: set without metric_name"):
        artifact.open_run(f"{tmp_path}/old", keep_top_k=2)  # asked for now, with no metric anywhere


def test_core_config_knows_only_its_own_fields_until_an_adapter_registers_its_names() -> None:
    # In a fresh interpreter: the core config refuses NeMo's and Ray's names until their adapter
    # modules are imported (``import ray_ckpt``'s names do that), then accepts them.
    import subprocess
    import sys

    code = (
        "from ray_ckpt.core.config import CheckpointConfig\n"
        "from ray_ckpt.core.errors import ConfigError\n"
        "for key in ('num_to_keep', 'save_period'):\n"
        "    try:\n"
        "        CheckpointConfig(**{key: 2})\n"
        "    except ConfigError as exc:\n"
        "        print('refused', str(exc).replace(';', ' (').split(' (')[0])\n"
        "import ray_ckpt.adapters.nemo_config, ray_ckpt.distributed.ray_config\n"
        "print(CheckpointConfig(num_to_keep=2).keep_last_n, CheckpointConfig(save_period=2).save_interval_steps)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.splitlines() == [
        "refused num_to_keep: unknown config field",
        "refused save_period: unknown config field",
        "2 2",
    ], done.stderr[-2000:]


def test_an_alias_may_not_shadow_a_field_or_another_frameworks_alias() -> None:
    from ray_ckpt.core.config import FieldAliases, register_aliases

    class Shadowing(FieldAliases):
        framework = "test"
        keys = ("keep_top_k",)

    class Taken(FieldAliases):
        framework = "test"
        keys = ("num_to_keep",)

    CheckpointConfig()  # the front door's names registered
    for aliases in (Shadowing(), Taken()):
        with pytest.raises(ValueError, match="already names a field, a group or another alias"):
            register_aliases(aliases)
