"""Checkpoint URIs (parse, normalise, key_and_version) and load_from_uri over runs, step dirs and mock://."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ray_ckpt
from ray_ckpt import CheckpointNotFoundError, CheckpointStore, ConfigError
from ray_ckpt.core.uri import normalize_storage_uri, parse_uri
from ray_ckpt.interop.mock import TinyPolicy

CWD = os.getcwd()


@pytest.mark.parametrize(
    ("uri", "kind", "storage", "run", "selector"),
    [
        ("/data/runs/run1", "run", "file:///data/runs", "run1", None),
        ("/data/runs/run1:latest", "run", "file:///data/runs", "run1", "latest"),
        ("/data/runs/run1/", "run", "file:///data/runs", "run1", None),
        ("file:///data/runs/run1:best", "run", "file:///data/runs", "run1", "best"),
        ("runs/run1:v12", "run", f"file://{CWD}/runs", "run1", 12),
        ("s3://bucket/runs/run1:step_12", "run", "s3://bucket/runs", "run1", 12),
        ("s3://bucket/run1:step_000000012", "run", "s3://bucket", "run1", 12),
        ("s3://bucket/a/b/run1", "run", "s3://bucket/a/b", "run1", None),
        ("mock://tiny", "mock", "mock://", "tiny", None),
        ("mock://tiny:v3", "mock", "mock://", "tiny", 3),
        ("/x/run1/checkpoints/step_000000007", "step", "file:///x", "run1", 7),
        ("s3://b/ckpts/run1:v5.pt", "file", "s3://b/ckpts", "run1", 5),
        ("/x/model.safetensors", "file", "file:///x", "model", None),
    ],
)
def test_parse_uri(uri: str, kind: str, storage: str, run: str, selector: Any) -> None:
    parsed = parse_uri(uri)
    assert (parsed.kind, parsed.storage_uri, parsed.run_name, parsed.selector) == (kind, storage, run, selector)


def test_scheme_colon_is_not_a_selector() -> None:
    parsed = parse_uri("s3://bucket/run1")
    assert parsed.selector is None and parsed.location == "s3://bucket/run1"
    assert parse_uri("s3://bucket/run1:latest").location == "s3://bucket/run1"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("/data/r/run1:v12", "file:///data/r/run1:step_12"),
        ("/data/r/run1:step_000000012", "/data/r/run1:v12"),
        ("/data/r/./run1:latest", "file:///data/r/run1:latest"),
        ("s3://bucket/run1/", "s3://bucket/run1"),
    ],
)
def test_normalize_uri_equal_for_same_checkpoint(a: str, b: str) -> None:
    assert ray_ckpt.normalize_uri(a) == ray_ckpt.normalize_uri(b)


def test_normalize_uri_forms() -> None:
    assert ray_ckpt.normalize_uri("runs/run1:step_3") == f"file://{CWD}/runs/run1:v3"
    assert ray_ckpt.normalize_uri("s3://b/run1:best") == "s3://b/run1:best"
    assert ray_ckpt.normalize_uri("mock://tiny:step_2") == "mock://tiny:v2"
    # the storage-URI helper is unchanged
    assert normalize_storage_uri("s3://bucket/x/") == "s3://bucket/x"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/r/run1:v12", ("run1", 12)),
        ("/r/run1:latest", ("run1", None)),
        ("/r/run1", ("run1", None)),
        ("s3://b/p/run1:best", ("run1", None)),
        ("file:///ck/my_run:v7.pt", ("my_run", 7)),
        ("/r/run1/checkpoints/step_000000042", ("run1", 42)),
        ("mock://tiny:v2", ("tiny", 2)),
    ],
)
def test_key_and_version(uri: str, expected: tuple[str, int | None]) -> None:
    assert ray_ckpt.key_and_version(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "   ",
        "s3://bucket",
        "s3://",
        "/r/run1:newest",
        "/r/run1:v",
        "/r/run1:v-1",
        "/r/.hidden",
        "/r/a:b:latest",
        "/x/model.pt:latest",
        "/x/run1/checkpoints/step_000000001:latest",
        "/",
    ],
)
def test_bad_uris_raise_config_error(uri: str) -> None:
    with pytest.raises(ConfigError):
        parse_uri(uri)


# ---------------------------------------------------------------------------------------------
# load_from_uri
# ---------------------------------------------------------------------------------------------
def _make_run(root: Path, run: str = "run1", **options: Any) -> CheckpointStore:
    store = CheckpointStore(str(root), run, **options)
    model = TinyPolicy()
    store.write_architecture(model, {"obs_dim": 4, "hidden": 8, "num_actions": 2})
    for step, loss in ((1, 0.9), (2, 0.2), (3, 0.5)):
        torch.manual_seed(step)
        state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        store.save(step, state, {"loss": loss}, trainer_state={"lr": 0.1 * step, "m": torch.ones(2) * step})
    return store


def test_load_from_uri_selectors(tmp_path: Path) -> None:
    store = _make_run(tmp_path)
    latest = ray_ckpt.load_from_uri(f"{tmp_path}/run1")
    assert latest.step == 3 and latest.run_name == "run1" and latest.metrics["loss"] == 0.5
    assert latest.trainer_state["lr"] == pytest.approx(0.3)
    assert ray_ckpt.load_from_uri(f"file://{tmp_path}/run1:latest").step == 3
    v1 = ray_ckpt.load_from_uri(f"{tmp_path}/run1:v1")
    assert v1.step == 1
    torch.testing.assert_close(v1.state_dict["body.weight"], store.load(1)["body.weight"])
    assert ray_ckpt.load_from_uri(f"{tmp_path}/run1:step_2").step == 2
    assert ray_ckpt.load_from_uri(f"{tmp_path}/run1/checkpoints/step_000000002").step == 2
    # :best needs a metric: the run recorded none, so it must be given
    with pytest.raises(ConfigError, match="metric"):
        ray_ckpt.load_from_uri(f"{tmp_path}/run1:best")
    assert ray_ckpt.load_from_uri(f"{tmp_path}/run1:best", metric="loss").step == 2
    assert ray_ckpt.load_from_uri(f"{tmp_path}/run1:best", metric="loss", mode="max").step == 1


def test_instantiate_builds_from_architecture_and_caches(tmp_path: Path) -> None:
    store = _make_run(tmp_path)
    artifact = ray_ckpt.load_from_uri(f"{tmp_path}/run1:v2")
    assert artifact.architecture is not None
    assert artifact.architecture.class_path == "ray_ckpt.interop.mock.TinyPolicy"
    model = artifact.instantiate()
    assert isinstance(model, TinyPolicy)
    torch.testing.assert_close(model.head.weight.detach(), store.load(2)["head.weight"])
    assert artifact.instantiate() is model


def test_instantiate_respects_allowed_prefixes(tmp_path: Path) -> None:
    _make_run(tmp_path)
    with pytest.raises(ray_ckpt.ArchitectureNotAllowedError):
        ray_ckpt.load_from_uri(f"{tmp_path}/run1", allowed_architecture_prefixes=["mypkg"])


def test_load_from_uri_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no run"):
        ray_ckpt.load_from_uri(f"{tmp_path}/nothing")
    _make_run(tmp_path)
    with pytest.raises(CheckpointNotFoundError):
        ray_ckpt.load_from_uri(f"{tmp_path}/run1:v99")


def test_artifact_without_architecture_cannot_instantiate(tmp_path: Path) -> None:
    CheckpointStore(str(tmp_path), "bare").save(1, {"w": torch.ones(2)})
    artifact = ray_ckpt.load_from_uri(f"{tmp_path}/bare")
    torch.testing.assert_close(artifact.state_dict["w"], torch.ones(2))
    with pytest.raises(CheckpointNotFoundError, match="model_architecture.json"):
        artifact.instantiate()


def test_mock_uri_is_deterministic_and_ready() -> None:
    a, b = ray_ckpt.load_from_uri("mock://tiny"), ray_ckpt.load_from_uri("mock://tiny:v4")
    assert a.source_format == "mock" and a.step == 0 and b.step == 4
    for key in a.state_dict:
        torch.testing.assert_close(a.state_dict[key], b.state_dict[key])
    other = ray_ckpt.load_from_uri("mock://other")
    assert not torch.equal(other.state_dict["body.weight"], a.state_dict["body.weight"])
    model = a.instantiate()
    assert isinstance(model, TinyPolicy)
    assert model(torch.zeros(3, 4)).shape == (3, 2)
    torch.testing.assert_close(model.body.weight.detach(), a.state_dict["body.weight"])


def test_load_from_uri_on_s3(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    bucket, options = s3_bucket
    store = CheckpointStore(f"{bucket}/runs", "run1", options)
    store.write_architecture(TinyPolicy(), {"obs_dim": 4, "hidden": 8, "num_actions": 2})
    store.save(5, TinyPolicy().state_dict(), {"loss": 1.0})
    store.save(6, TinyPolicy().state_dict(), {"loss": 0.5})
    artifact = ray_ckpt.load_from_uri(f"{bucket}/runs/run1:v5", storage_options=options)
    assert artifact.step == 5 and artifact.metrics == {"loss": 1.0}
    assert artifact.uri == f"{bucket}/runs/run1/checkpoints/step_000000005"
    assert isinstance(artifact.instantiate(), TinyPolicy)
    assert ray_ckpt.load_from_uri(f"{bucket}/runs/run1:latest", storage_options=options).step == 6


_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_\-+=@,]{0,20}", fullmatch=True)
_selectors = st.one_of(
    st.none(),
    st.sampled_from(["latest", "best"]),
    st.integers(0, 10**12).map(lambda n: f"v{n}"),
    st.integers(0, 10**12).map(lambda n: f"step_{n:09d}"),
)


@settings(max_examples=150, deadline=None)
@given(
    prefix=st.sampled_from(["/data/runs", "file:///data/runs", "s3://bucket", "s3://bucket/a/b", "memory://m"]),
    name=_names,
    selector=_selectors,
)
def test_uri_round_trip_property(prefix: str, name: str, selector: str | None) -> None:
    uri = f"{prefix}/{name}" + (f":{selector}" if selector else "")
    normalized = ray_ckpt.normalize_uri(uri)
    assert ray_ckpt.normalize_uri(normalized) == normalized
    run, step = ray_ckpt.key_and_version(uri)
    assert run == name
    expected = int(selector.split("_")[-1].lstrip("v")) if selector and selector not in ("latest", "best") else None
    assert step == expected
    parsed = parse_uri(normalized)
    assert parsed.run_uri == parsed.location and parsed.location.endswith(f"/{name}")


def test_best_selector_uses_the_policy_any_writer_recorded(tmp_path: Path) -> None:
    """A plain store (not the manager) records its metric/mode in each marker; :best needs no flags."""
    store = CheckpointStore(str(tmp_path), run_name="ranked", metric_name="score", mode="max", keep_last_n=5)
    for step, score in [(1, 0.2), (2, 0.9), (3, 0.4)]:
        store.save(step, {"w": torch.full((2,), float(step))}, metrics={"score": score})
    artifact = ray_ckpt.load_from_uri(f"{tmp_path}/ranked:best")
    assert artifact.step == 2
    from ray_ckpt.interop.artifact import open_run

    reader = open_run(f"{tmp_path}/ranked")
    assert reader.config.metric_name == "score" and reader.config.mode == "max" and reader.config.keep_last_n == 5


def test_a_hugging_face_index_is_a_file_and_a_model_folder_is_a_directory(tmp_path: Path) -> None:
    index = parse_uri(f"{tmp_path}/gpt-tiny/model.safetensors.index.json")
    assert index.kind == "file" and index.run_name == "gpt-tiny"
    assert parse_uri("s3://b/models/llama/pytorch_model.bin.index.json").kind == "file"
    assert parse_uri("s3://b/models/llama").kind == "run"  # a folder: load_from_uri looks inside
    with pytest.raises(ConfigError, match="selector"):
        parse_uri(f"{tmp_path}/gpt-tiny/model.safetensors.index.json:latest")
