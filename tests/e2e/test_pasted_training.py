"""The pasted testbed trains: Polishing Teacher for 2 iterations on it (labeled, unlabeled with
the open images, validation, test), with the real COCO sample (../shared/data/coco128) as source."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssod.training import run

COCO128 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco128"
SOURCE_JSON = COCO128 / "annotations" / "instances_train2017.json"
SOURCE_IMAGES = COCO128 / "train2017"

pytestmark = pytest.mark.skipif(
    not (SOURCE_JSON.is_file() and SOURCE_IMAGES.is_dir()),
    reason=f"coco128 is not at {COCO128} (the shared real-data fixture beside the project)",
)


def test_two_iterations_evaluate_on_validation_and_test(make_config, mlflow_store, tmp_path: Path):
    metrics = run(make_config(
        "data=pasted", f"data.cache_dir={tmp_path / 'cache'}", "data.percent=25",
        f"data.pasted.source_json={SOURCE_JSON}", f"data.pasted.source_images={SOURCE_IMAGES}",
        "data.pasted.num_train=16", "data.pasted.num_open=4", "data.pasted.num_val=4", "data.pasted.num_test=3",
        "train.iterations=2", "train.eval_every=2",
        method="polish_teacher",
    ))
    run_ = mlflow_store.only_run()
    assert run_.info.status == "FINISHED"
    for key in ("val/teacher/bbox_AP", "val/student/bbox_AP", "test/teacher/bbox_AP"):
        assert 0.0 <= metrics[key] <= 1.0 and mlflow_store.steps(run_.info.run_id, key) == [2]
    assert "val/teacher/bbox_AP/person" in run_.data.metrics  # classes under the source's names
    counts = run_.data.params  # static dataset counts are params
    assert (counts["data/train/images"], counts["data/unlabeled/images"]) == ("4", str(12 + 4))  # the open images too
    assert (counts["data/eval/images"], counts["data/test/images"]) == ("4", "3")
    contexts = {tag.value: entry.dataset.name for entry in run_.inputs.dataset_inputs for tag in entry.tags
                if tag.key == "mlflow.data.context"}
    assert contexts["unlabeled"] == "pasted/train.1@25-unlabeled+open.json"
