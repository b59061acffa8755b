"""The method benchmark's report (experiments/benchmark.py): tuning chooses on the
validation split, never on the test split, and compares the chosen variants paired by seed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmark.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("ssod_method_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _row(arm: str, seed: int, val: float, test: float) -> dict:
    return {"arm": arm, "seed": seed, "percent": 2.5, "val_teacher_AP": val, "test_teacher_AP": test,
            "test_teacher_AP75": test, "test_student_AP": test}


def test_variants_are_chosen_on_validation_and_compared_on_test_by_seed():
    benchmark = _benchmark()
    rows = []
    for seed in (0, 1, 2):
        rows += [
            # The alternative is better on test but worse on val: the default is chosen.
            _row("supervised", seed, val=0.50, test=0.50), _row("supervised_lr_mid", seed, val=0.49, test=0.60),
            _row("soft_teacher", seed, val=0.40, test=0.40), _row("soft_teacher_w1", seed, val=0.41, test=0.45),
            _row("polish_teacher", seed, val=0.45, test=0.45), _row("polish_teacher_w1", seed, val=0.52, test=0.51 + seed / 100),
        ]
    lines = benchmark.chosen_on_val(rows)
    assert "supervised -> **supervised**, soft_teacher -> **soft_teacher_w1**, polish_teacher -> **polish_teacher_w1**" in lines[0]
    assert "- polish_teacher_w1 - supervised, test teacher AP (paired): +2.0 ± 1.0 (3/3 > 0)" in lines
    assert "- polish_teacher_w1 - soft_teacher_w1, test teacher AP (paired): +7.0 ± 1.0 (3/3 > 0)" in lines


def test_no_choice_before_every_variant_has_run_on_the_same_seeds():
    benchmark = _benchmark()
    rows = [_row(arm, 0, 0.5, 0.5) for arm in ("supervised", "supervised_lr_mid", "soft_teacher", "soft_teacher_w1",
                                              "polish_teacher")]
    assert benchmark.chosen_on_val(rows) == []
    rows.append(_row("polish_teacher_w1", 0, 0.5, 0.5))
    rows.append(_row("polish_teacher_w1", 1, 0.5, 0.5))  # one seed more than its default
    assert benchmark.chosen_on_val(rows) == []


def test_no_choice_when_the_variants_ran_as_many_seeds_but_not_the_same_ones():
    benchmark = _benchmark()
    rows = [_row(arm, 0, 0.5, 0.5) for arm in benchmark.TUNED_ARMS + benchmark.MAIN_ARMS]
    assert benchmark.chosen_on_val(rows)  # the same seed everywhere: a choice
    rows = [row for row in rows if row["arm"] != "supervised_lr_mid"] + [_row("supervised_lr_mid", 1, 0.6, 0.5)]
    assert benchmark.chosen_on_val(rows) == []


def test_rewriting_the_table_keeps_what_a_person_wrote_around_it(tmp_path: Path, capsys):
    benchmark = _benchmark()
    args = benchmark.parse_args(["--table-only", "--out-dir", str(tmp_path)])
    path = tmp_path / "method_benchmark.md"
    record = {**_row("supervised", 0, val=0.5, test=0.5), "test_teacher_AP50": 0.8, "test_student_AP": 0.5,
              "labeled_images": 100, **dict.fromkeys(["pseudo_iou_raw", "pseudo_iou_polished", "label_acc_raw",
                                                     "label_acc_polished", "wrong_to_right", "right_to_wrong"])}
    first = benchmark.write_markdown(args, [record], path, None)
    assert "| supervised | 1 | 50.0 |" in first and first.startswith("# Method benchmark")
    path.write_text(first.replace("# Method benchmark (synthetic shapes)\n", "# Machine A\n\nRan on machine A.\n")
                    + "\nRead the paired differences.\n")
    second = benchmark.write_markdown(args, [{**record, "test_teacher_AP": 0.6}], path, None)
    assert path.read_text() == second
    assert second.startswith("# Machine A\n\nRan on machine A.\n") and second.endswith("\nRead the paired differences.\n")
    assert "| supervised | 1 | 60.0 |" in second and "| supervised | 1 | 50.0 |" not in second
    assert second.count(benchmark.GENERATED_BEGIN) == 1 and second.count(benchmark.GENERATED_END) == 1
    # A hand-edited file from before the markers: replaced, its text kept beside it.
    path.write_text("# Machine B\n\nhand-written\n")
    benchmark.write_markdown(args, [record], path, None)
    assert (tmp_path / "method_benchmark.md.before-markers").read_text() == "# Machine B\n\nhand-written\n"
    assert "no generated-part markers" in capsys.readouterr().err


def test_the_plan_runs_the_main_comparison_first_and_the_oracles_on_the_first_seed_only():
    benchmark = _benchmark()
    args = benchmark.parse_args(["--percents", "2.5", "--seeds", "0", "1", "2", "--ablation-seeds", "2"])
    runs = benchmark.plan_runs(args)
    arms = [run.arm for run in runs]
    assert arms[:3] == ["supervised"] * 3 and arms.index("oracle") > arms.index("polish_teacher_w1")
    assert [run.seed for run in runs if run.arm in ("oracle", "oracle_w1")] == [0, 0]
    assert [run.seed for run in runs if run.arm == "pt_no_polish"] == [0, 1]
    assert len(runs) == 3 * 6 + 2 + 3 * 2
    assert "method.unsup_weight=1.0" in benchmark.ARMS["oracle_w1"] and "method.pseudo_labels=oracle" in benchmark.ARMS["oracle_w1"]


def test_a_profile_sets_the_sizes_and_a_flag_overrides_it():
    benchmark = _benchmark()
    long = benchmark.parse_args(["--profile", "cpu-long", "--seeds", "0", "--", "data.num_workers=0"])
    assert (long.iterations, long.burn_in, long.seeds, long.percents) == (900, 400, [0], [2.5])
    assert long.overrides == ["train.eval_every=150", "data.num_workers=0"]
    assert benchmark.parse_args(["--profile", "cpu", "--iterations", "50"]).iterations == 50


def test_each_polishing_teacher_variant_is_compared_with_soft_teacher_at_the_same_weight():
    benchmark = _benchmark()
    empty = {key: None for key in (*benchmark.FINAL, *benchmark.QUALITY_MEAN, *benchmark.QUALITY_SUM)}
    rows = [{**empty, **_row("polish_teacher_w1", s, 0.5, 0.52 + s / 100)} for s in (0, 1)]
    rows += [{**empty, **_row(arm, s, 0.5, 0.50)} for arm, s in (("soft_teacher_w1", 0), ("soft_teacher_w1", 1), ("soft_teacher", 0))]
    text = benchmark.table(rows)
    assert "polish_teacher_w1 - soft_teacher_w1, test teacher AP (paired): +2.5 ± 0.7 (2/2 > 0)" in text
    assert "polish_teacher - soft_teacher," not in text  # polish_teacher at weight 3 did not run
