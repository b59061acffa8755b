"""``ssod-eval``: a training checkpoint scored on the validation set, written as strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssod.eval import main
from ssod.train import run
from tests.conftest import tiny_overrides


def test_ssod_eval_scores_a_checkpoint_and_writes_strict_json(make_config, tmp_path: Path, dataset_cache, mlflow_uri):
    trained = run(make_config("train.iterations=1"))
    out = tmp_path / "metrics.json"
    overrides = tiny_overrides(tmp_path, dataset_cache, mlflow_uri)
    assert main([str(tmp_path / "outputs" / "checkpoints"), "--cpu", "--out", str(out), "--overrides", *overrides]) == 0

    def refuse(constant: str):
        pytest.fail(f"not strict JSON: {constant}")

    record = json.loads(out.read_text(), parse_constant=refuse)
    assert record["step"] == 1 and record["checkpoint"].endswith("step-00000001.pt")
    assert record["teacher/bbox_images"] == 8.0 and record["teacher/bbox_unreadable_images"] == 0.0
    assert None in record.values()  # a metric without ground truth (NaN) is null
    # The same teacher weights on the same images: the training run's final evaluation.
    for key in ("AP", "AP50", "AR100"):
        assert record[f"teacher/bbox_{key}"] == pytest.approx(trained[f"val/teacher/bbox_{key}"], rel=1e-6, abs=1e-9)


def test_ssod_eval_makes_a_user_error_one_line(tmp_path: Path, capsys):
    assert main([str(tmp_path / "no-such-run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ssod-eval: error: checkpoint={tmp_path / 'no-such-run'}: no such checkpoint file"]
