"""The method benchmark (experiments/benchmark.py): its plan, its intervals and its report."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmark.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("ssod_method_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _row(arm: str, seed: int, val: float, test: float, percent: float = 0.5) -> dict:
    return {"testbed": "synthetic", "arm": arm, "seed": seed, "percent": percent, "val_teacher_AP": val,
            "test_teacher_AP": test, "test_AP": test, "test_teacher_AP75": test, "test_student_AP": test}


def test_the_plan_goes_seed_by_seed_with_the_ablations_at_the_main_setting_only():
    benchmark = _benchmark()
    args = benchmark.parse_args(["--percents", "0.5", "2.5", "--seeds", "0", "1", "2", "--ablation-seeds", "2"])
    runs = benchmark.plan_runs(args)
    first_seed = [run.arm for run in runs[:7]]
    assert first_seed == ["supervised", "polish_teacher", "soft_teacher", "oracle", "pt_no_polish", "pt_box_only",
                          "pt_cls_only"]
    assert [run.seed for run in runs if run.percent == 0.5] == [0] * 7 + [1] * 7 + [2] * 4
    assert {run.arm for run in runs if run.percent == 2.5} == set(benchmark.MAIN_ARMS)
    assert len(runs) == 7 + 7 + 4 + 3 * 4
    # Once a seed has begun, nothing of another seed comes between its runs.
    order = [(run.percent, run.seed) for run in runs]
    assert order == sorted(order, key=lambda key: order.index(key))


def test_a_profile_sets_the_sizes_and_a_flag_overrides_it():
    benchmark = _benchmark()
    args = benchmark.parse_args(["--profile", "cpu", "--seeds", "0", "--", "data.num_workers=0"])
    assert (args.iterations, args.burn_in, args.seeds, args.percents, args.num_test) == (900, 400, [0], [0.5, 2.5], 2000)
    assert args.overrides == ["train.eval_every=150", "data.strong_rotate_deg=0", "data.strong_shear_deg=0",
                              "data.num_workers=0"]
    assert benchmark.parse_args(["--profile", "cpu", "--iterations", "50"]).iterations == 50


def test_rewriting_the_table_keeps_what_a_person_wrote_around_it(tmp_path: Path, capsys):
    benchmark = _benchmark()
    args = benchmark.parse_args(["--table-only", "--out-dir", str(tmp_path)])
    path = tmp_path / "method_benchmark.md"
    record = {**_row("supervised", 0, val=0.5, test=0.5), "test_teacher_AP50": 0.8, "labeled_images": 20}
    first = benchmark.write_markdown(args, [record], [], path, None)
    assert "| supervised | 1 | 50.0 |" in first and first.startswith("# Method benchmark")
    path.write_text(first.replace("# Method benchmark (synthetic shapes)\n", "# Plan\n\nWritten first.\n")
                    + "\nRead the paired differences.\n")
    second = benchmark.write_markdown(args, [{**record, "test_teacher_AP": 0.6}], [], path, None)
    assert path.read_text() == second
    assert second.startswith("# Plan\n\nWritten first.\n") and second.endswith("\nRead the paired differences.\n")
    assert "| supervised | 1 | 60.0 |" in second and "| supervised | 1 | 50.0 |" not in second
    assert second.count(benchmark.GENERATED_BEGIN) == 1 and second.count(benchmark.GENERATED_END) == 1
    # A hand-edited file from before the markers: replaced, its text kept beside it.
    path.write_text("# Machine B\n\nhand-written\n")
    benchmark.write_markdown(args, [record], [], path, None)
    assert (tmp_path / "method_benchmark.md.before-markers").read_text() == "# Machine B\n\nhand-written\n"
    assert "no generated-part markers" in capsys.readouterr().err


def test_the_plateau_criterion_reads_the_mean_validation_curve():
    benchmark = _benchmark()
    flat = [{"val_curve": [[150, 0.40], [300, 0.500], [450, 0.505]]}, {"val_curve": [[150, 0.42], [300, 0.52], [450, 0.52]]}]
    assert benchmark.plateau(flat) == "41.0 51.0 51.2 (plateau)"
    rising = [{"val_curve": [[150, 0.40], [300, 0.45]]}]
    assert benchmark.plateau(rising) == "40.0 45.0 (still moving)"
    assert benchmark.plateau([{"val_curve": [[150, 0.4]]}]) == "-"


def _detections_of(gt: dict, shift: float) -> list[dict]:
    """Each ground-truth box, moved right by ``shift`` pixels (0: perfect)."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
             "bbox": [a["bbox"][0] + shift, a["bbox"][1], a["bbox"][2], a["bbox"][3]]} for a in gt["annotations"]]


def test_the_summary_bootstraps_paired_differences_from_the_runs_test_detections(tmp_path: Path):
    import gzip
    import json

    benchmark = _benchmark()
    rng = random.Random(0)
    annotations = [{"id": i + 1, "image_id": i // 2 + 1, "category_id": 1, "iscrowd": 0, "area": 400.0,
                    "bbox": [rng.uniform(0, 60), rng.uniform(0, 60), 20.0, 20.0]} for i in range(40)]
    gt = {"images": [{"id": i, "width": 100, "height": 100} for i in range(1, 21)],
          "categories": [{"id": 1, "name": "thing"}], "annotations": annotations}
    (tmp_path / "test.json").write_text(json.dumps(gt))
    records = []
    for seed in (0, 1, 2):
        for arm, shift in (("polish_teacher", 1.0 + seed), ("supervised", 6.0 + seed)):
            path = tmp_path / f"{arm}-{seed}.json.gz"
            path.write_bytes(gzip.compress(json.dumps({"image_ids": list(range(1, 21)),
                                                       "results": _detections_of(gt, shift)}).encode()))
            records.append({**_row(arm, seed, 0.5, 0.5), "detections": str(path), "test_json": str(tmp_path / "test.json")})
    summary = benchmark.summarize(records, replicates=100, previous=[])
    assert [s["comparison"] for s in summary] == ["polish_teacher-supervised"]
    (entry,) = summary
    assert entry["seeds"] == 3 and entry["positive"] == 3 and 0 < entry["ci_low"] <= entry["mean"] <= entry["ci_high"]
    # Detections not on this machine: the previous record is kept, not dropped or recomputed.
    for record in records:
        record["detections"] = str(tmp_path / "elsewhere.json.gz")
    assert benchmark.summarize(records, replicates=100, previous=summary) == summary


def test_oracle_share_and_labeled_images_saved():
    benchmark = _benchmark()
    summary = [{"testbed": "synthetic", "percent": 0.5, "comparison": "polish_teacher-supervised", "mean": 0.04},
               {"testbed": "synthetic", "percent": 0.5, "comparison": "oracle-supervised", "mean": 0.10}]
    records = []
    for seed in (0, 1):
        records += [{**_row("supervised", seed, 0, 0.40), "labeled_images": 20},
                    {**_row("supervised", seed, 0, 0.50, percent=2.5), "labeled_images": 100},
                    {**_row("polish_teacher", seed, 0, 0.45), "labeled_images": 20}]
    lines = benchmark.derived_claims(records, summary, 0.5)
    assert "Share of the oracle's gain: 40% (+4.00 of +10.00 AP)." in lines[0]
    # Halfway in AP between 20 and 100 labeled images, log-linear: sqrt(20 * 100) = 45.
    assert "median 45 over 2 seeds" in lines[1]


def test_a_seed_continued_on_another_cpu_runs_again_and_its_old_runs_are_kept_aside(tmp_path: Path):
    benchmark = _benchmark()
    here, there = "host-b: Intel Xeon, 2 cores, AVX-512", "host-a: AMD EPYC, 2 cores"
    records = {}
    for arm in ("supervised", "polish_teacher"):  # seed 0 unfinished on machine A
        records[f"mb-{arm}-0.5pct-s0"] = {**_row(arm, 0, 0.5, 0.5), "machine": there}
    for arm in benchmark.MAIN_ARMS:  # seed 1 complete on machine A: kept
        records[f"mb-{arm}-0.5pct-s1"] = {**_row(arm, 1, 0.5, 0.5), "machine": there}
    args = benchmark.parse_args(["--percents", "0.5", "--seeds", "0", "1", "--arms", *benchmark.MAIN_ARMS])
    todo = [run for run in benchmark.plan_runs(args) if run.name not in records]
    moved = benchmark.set_aside_other_machines(records, todo, here)
    assert sorted(benchmark.run_key(r) for r in moved) == ["mb-polish_teacher-0.5pct-s0", "mb-supervised-0.5pct-s0"]
    assert {r["seed"] for r in records.values()} == {1}
    # The same CPU under another host name: nothing moves.
    records["mb-supervised-0.5pct-s0"] = {**_row("supervised", 0, 0.5, 0.5), "machine": "host-c: Intel Xeon, 2 cores, AVX-512"}
    assert benchmark.set_aside_other_machines(records, todo, here) == []
    benchmark.save_results(tmp_path / "b.json", records, [], moved)
    import json

    saved = json.loads((tmp_path / "b.json").read_text())
    assert [r["arm"] for r in saved["superseded"]] == ["supervised", "polish_teacher"]
    assert all("another CPU" in r["superseded_because"] for r in saved["superseded"])


def test_each_method_gets_the_same_learning_rate_grid_and_its_arms_take_the_rate_chosen_on_validation(tmp_path: Path):
    benchmark = _benchmark()
    args = benchmark.parse_args(["--profile", "cpu", "--seeds", "3", "4", "--lr-grid", "0.1", "1.0"])
    wanted = benchmark.selection_runs(args)
    assert [(run.arm, run.lr_gamma) for run in wanted] == [
        (method, gamma) for method in benchmark.SELECTED_METHODS for gamma in (0.1, 1.0)]
    assert {(run.percent, run.seed) for run in wanted} == {(0.5, 3)}  # the main setting's first seed
    rows = [{"method": run.arm, "lr_gamma": run.lr_gamma, "val_teacher_AP": value}
            for run, value in zip(wanted, [0.40, 0.45, 0.50, 0.50, 0.52, 0.48])]
    chosen = benchmark.choose_lr(rows)
    assert chosen == {"supervised": 1.0, "soft_teacher": 0.1, "polish_teacher": 0.1}  # a tie: the first
    runs = benchmark.with_chosen_lr(benchmark.plan_runs(args), chosen)
    assert {run.arm: run.lr_gamma for run in runs} == {
        "supervised": 1.0, "soft_teacher": 0.1, "polish_teacher": 0.1, "oracle": 0.1, "pt_no_polish": 0.1,
        "pt_box_only": 0.1, "pt_cls_only": 0.1}
    # The chosen selection run is the seed's arm: the same name, so it is not trained twice.
    assert benchmark.Run("supervised", 0.5, 3, 1.0).name in {run.name for run in runs}
    assert benchmark.run_key({"arm": "supervised", "percent": 0.5, "seed": 3, "lr_gamma": 1.0}) == "mb-supervised-0.5pct-s3-lr1"
    # The selection is kept in the json across later writes, and shown in the report.
    selection = {"grid": [0.1, 1.0], "percent": 0.5, "seed": 3, "runs": rows, "chosen": chosen}
    path = tmp_path / "b.json"
    benchmark.save_results(path, {}, [], selection=selection)
    benchmark.save_results(path, {}, [])
    assert benchmark.load_selection(path) == selection
    text = benchmark.selection_table(selection)
    assert "| supervised | 40.0 | 45.0 | 1.0 |" in text and "| polish_teacher | 52.0 | 48.0 | 0.1 |" in text
    # Without a grid there is no selection and the arms keep the config's rate.
    bare = benchmark.parse_args(["--seeds", "0", "--lr-grid"])
    assert benchmark.selection_runs(bare) == [] and benchmark.with_chosen_lr(benchmark.plan_runs(bare), {})[0].lr_gamma is None


def test_pseudo_label_quality_is_read_under_its_new_name_and_under_the_name_older_runs_logged(mlflow_uri: str):
    """A benchmark started before the rename has runs with ``pseudo/raw/iou_mean``; newer
    runs log ``pseudo/iou_mean/raw``: both are read."""
    import argparse

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    benchmark = _benchmark()
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("b")
    old, new = (client.create_run(experiment).info.run_id for _ in range(2))
    client.log_batch(old, metrics=[Metric("pseudo/raw/iou_mean", 0.5, 0, 10), Metric("pseudo/polished/label_acc", 0.7, 0, 10)])
    client.log_batch(new, metrics=[Metric("pseudo/iou_mean/raw", 0.6, 0, 10), Metric("pseudo/label_acc/polished", 0.8, 0, 10)])
    args = argparse.Namespace(overrides=[f"tracking.uri={mlflow_uri}"])
    for run_id, iou, accuracy in ((old, 0.5, 0.7), (new, 0.6, 0.8)):
        histories = benchmark._histories(args, run_id)
        assert histories["pseudo/iou_mean/raw"] == [(10, iou)] and histories["pseudo/label_acc/polished"] == [(10, accuracy)]
    assert benchmark._old_name("pseudo/recall/cls") == "pseudo/cls/recall" and benchmark._old_name("x") == "x"
