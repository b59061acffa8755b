"""Pictures drawn with matplotlib: pseudo-label quality before and after polishing over training."""

from __future__ import annotations

import numpy as np

from ssod.plots import before_after_picture


def test_before_after_draws_raw_and_polished_of_each_measure_over_the_steps():
    histories = {"pseudo/iou_mean/raw": [(20, 0.6), (10, 0.5)], "pseudo/iou_mean/polished": [(10, 0.7), (20, 0.8)],
                 "pseudo/label_acc/raw": [(10, 0.9)]}  # label_acc/polished missing: no line, no error
    picture = np.asarray(before_after_picture(histories))
    assert picture.shape[1] > 1000 and picture.shape[0] > 400  # two panels, readable
    red, blue = np.array([214, 39, 40]), np.array([31, 119, 180])  # matplotlib's tab:red, tab:blue
    left, right = picture[:, : picture.shape[1] // 2], picture[:, picture.shape[1] // 2 :]
    assert (np.abs(left - red).sum(-1) < 30).any() and (np.abs(left - blue).sum(-1) < 30).any()
    assert (np.abs(right - red).sum(-1) < 30).any() and not (np.abs(right - blue).sum(-1) < 30).any()


def test_the_run_gets_the_before_after_picture_from_its_history_when_it_has_one(mlflow_uri: str, mlflow_store):
    from ssod.report import BEFORE_AFTER_PICTURE, log_before_after
    from ssod.tracking import Tracker

    tracker = Tracker(mlflow_uri, "plots")
    bare = tracker.start("no pseudo-label quality (supervised)")
    log_before_after(tracker)
    tracker.end("FINISHED")
    tracker = Tracker(mlflow_uri, "plots")
    measured = tracker.start("polish_teacher")
    for step, raw, polished in ((10, 0.5, 0.6), (20, 0.55, 0.7)):
        tracker.log_metrics({"pseudo/iou_mean/raw": raw, "pseudo/iou_mean/polished": polished}, step)
    log_before_after(tracker)
    tracker.end("FINISHED")
    assert mlflow_store.artifacts(bare) == []
    assert mlflow_store.artifacts(measured) == [BEFORE_AFTER_PICTURE]
