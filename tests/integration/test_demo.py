"""The demo end to end (its example config, on the session's Ray): storage holds what retention keeps.

Measured before retention ran after scores and lease releases: steps the rules no longer kept
(scored out of the top 3 while an evaluator still held its lease) stayed on storage, and which
ones depended on timing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ray_ckpt import CheckpointConfig, CheckpointStore
from ray_ckpt.cli import main
from ray_ckpt.demo import format_table, run_demo
from ray_ckpt.layout import parse_step_dir

pytestmark = pytest.mark.usefixtures("ray_session")

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "example.yaml"


def test_demo_storage_is_what_its_retention_keeps(
    tmp_path: Path, run_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = CheckpointConfig.from_yaml(str(EXAMPLE)).replace(storage_uri=str(tmp_path / "runs"), run_name=run_name)
    assert (config.keep_top_k, config.keep_last_n, config.keep_period) == (3, 2, 10)
    top = run_demo(config, steps=40)

    store = CheckpointStore(config=config)
    records = store.list()
    assert records[-1].step == 40
    assert store.leased_steps() == set()  # every evaluator released its leases
    keep, delete = store.retention_plan()
    directory = tmp_path / "runs" / run_name / "checkpoints"
    on_disk = sorted(s for s in (parse_step_dir(n) for n in os.listdir(directory)) if s is not None)
    assert on_disk == keep and delete == [], (on_disk, keep, delete)

    # the rules, recomputed from the records: top 3 by eval/return, the last 2, every 10th, the latest
    scored = sorted((r for r in records if r.metric("eval/return") is not None),
                    key=lambda r: (-r.metrics["eval/return"], -r.step))
    expected = {r.step for r in scored[:3]} | {38, 40} | {s for s in on_disk if s % 10 == 0}
    assert set(on_disk) == expected
    assert [i.step for i in top] == [r.step for r in scored[:3]]

    capsys.readouterr()
    assert main(["retention", str(tmp_path / "runs" / run_name), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["would_delete"] == [] and [r["step"] for r in report["steps"]] == on_disk
    assert main(["retention", str(tmp_path / "runs" / run_name)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "nothing to delete"
    assert "kept on storage: " + ", ".join(map(str, on_disk)) in format_table(top, records)
