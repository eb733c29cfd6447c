"""validate_run_name and normalize_storage_uri (the rest of ray_ckpt.core.uri is tested elsewhere)."""

from __future__ import annotations

import os

import pytest

from ray_ckpt import ConfigError
from ray_ckpt.core.uri import MAX_RUN_NAME_LENGTH, normalize_storage_uri, validate_run_name


@pytest.mark.parametrize(
    "name", ["run", "run1", "a", "0", "exp-1.2_b", "x+y=z", "user@host", "a,b", "A" * MAX_RUN_NAME_LENGTH]
)
def test_valid_run_names(name: str) -> None:
    assert validate_run_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        "a..b",
        ".hidden",
        "-flag",
        "_x",
        "a/b",
        "/abs",
        "a\\b",
        "a\x00b",
        "a:b",
        "s3://x",
        "sp ace",
        "tab\t",
        "new\nline",
        "ünïcode",
        "star*",
        "q?",
        "A" * (MAX_RUN_NAME_LENGTH + 1),
    ],
)
def test_invalid_run_names_name_the_field(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^run_name:"):
        validate_run_name(name)


def test_invalid_run_name_uses_given_field_name() -> None:
    with pytest.raises(ConfigError, match=r"^experiment:"):
        validate_run_name("a/b", field_name="experiment")


@pytest.mark.parametrize("value", [None, 3, b"run", ["run"]])
def test_run_name_must_be_str(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^run_name: expected str"):
        validate_run_name(value)  # type: ignore[arg-type]


def test_normalize_bare_paths(tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert normalize_storage_uri("/data/runs") == "file:///data/runs"
    assert normalize_storage_uri("/data/runs/") == "file:///data/runs"
    assert normalize_storage_uri("rel/dir") == "file://" + os.path.join(str(tmp_path), "rel", "dir")
    assert normalize_storage_uri(".") == "file://" + str(tmp_path)
    assert normalize_storage_uri("/a/./b/../c") == "file:///a/c"
    home = os.path.expanduser("~")
    assert normalize_storage_uri("~/ckpts") == "file://" + os.path.join(home, "ckpts")


def test_normalize_file_uris(tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert normalize_storage_uri("file:///data/runs") == "file:///data/runs"
    assert normalize_storage_uri("file:///data/runs/") == "file:///data/runs"
    assert normalize_storage_uri("file://") == "file:///"
    assert normalize_storage_uri("file://rel") == "file://" + os.path.join(str(tmp_path), "rel")


def test_normalize_remote_uris_untouched_except_trailing_slash() -> None:
    assert normalize_storage_uri("s3://bucket/prefix") == "s3://bucket/prefix"
    assert normalize_storage_uri("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert normalize_storage_uri("s3://bucket") == "s3://bucket"
    assert normalize_storage_uri("gs://b/p//") == "gs://b/p"
    assert normalize_storage_uri("memory://x") == "memory://x"
    assert normalize_storage_uri("memory://") == "memory://"


def test_normalize_is_idempotent(tmp_path: os.PathLike) -> None:
    for uri in [str(tmp_path), "file:///x/y", "s3://b/p/", "memory://m/"]:
        once = normalize_storage_uri(uri)
        assert normalize_storage_uri(once) == once


@pytest.mark.parametrize("value", ["", None, 5])
def test_normalize_rejects_empty(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^storage_uri:"):
        normalize_storage_uri(value)  # type: ignore[arg-type]
