"""End to end: train a tiny detector, evaluate, checkpoint, resume, and read it all back from MLflow."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
from pathlib import Path

import pytest
import torch

from ssod.bootstrap import ImageMatches
from ssod.checkpoint import list_checkpoints, load_checkpoint
from ssod.evaluation import coco_from_dataset, read_detections
from ssod.data.splits import make_split, split_paths
from ssod.data.synthetic import SyntheticRecipe, ensure_synthetic
from ssod.tracking import machine_description
from ssod.training import run

LITE0 = {"method": "polish_teacher", "model": "efficientnet_lite0_fpn"}
SECRET = "postgresql+psycopg2://u:secret@h/db"
MASKED = "postgresql+psycopg2://u:***@h/db"
# Iterations 1-3, evaluations at 2 and 3, checkpoints at 2 and 3; then a resume to 4.
SCHEDULE = ("train.eval_every=2", "train.ckpt_every=2", "train.keep_checkpoints=5", "data.val_max_images=4")


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs"


def final_checkpoint(output_dir: Path) -> dict:
    return load_checkpoint(list_checkpoints(output_dir / "checkpoints")[-1][1])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["supervised", "soft_teacher", "polish_teacher"])
def test_train_evaluate_checkpoint_resume_and_track(method: str, make_config, mlflow_store, tmp_path: Path):
    secrets = (f"data.train_json='{SECRET}'", f"+tracking.tags.database='{SECRET}'")
    first = run(make_config(*SCHEDULE, *secrets, "train.iterations=3", method=method))
    assert 0.0 <= first["val/teacher/bbox_AP"] <= 1.0
    checkpoints = tmp_path / "outputs" / "checkpoints"
    assert [step for step, _ in list_checkpoints(checkpoints)] == [2, 3]
    # A crash after step 3 was logged but before its checkpoint: the resume restarts at 2,
    # recomputes step 3 (already in MLflow, not logged again) and goes on to 4.
    (checkpoints / "step-00000003.pt").unlink()
    # ... so the run's tag says checkpoint 2 (otherwise the resume would go back: a new run).
    mlflow_store.client.set_tag(mlflow_store.only_run().info.run_id, "ssod.checkpoint_step", "2")
    final = run(make_config(*SCHEDULE, *secrets, "train.iterations=4", "train.resume=auto", "train.run_name=renamed",
                      method=method))
    assert [step for step, _ in list_checkpoints(checkpoints)] == [2, 4]

    run_ = mlflow_store.only_run()
    run_id = run_.info.run_id
    assert run_.info.status == "FINISHED"
    assert load_checkpoint(checkpoints / "step-00000004.pt")["mlflow_run_id"] == run_id
    # The resolved config a checkpoint and the output folder carry: no password either.
    carried = load_checkpoint(checkpoints / "step-00000004.pt")["config"]
    assert carried["data"]["train_json"] == MASKED and carried["tracking"]["tags"]["database"] == MASKED
    assert "secret" not in (tmp_path / "outputs" / "config.yaml").read_text()
    params = run_.data.params
    assert params["train.lr"] == "0.01" and params["method.name"] == method
    assert params["train.iterations"] == "3"  # params of the first start; MLflow cannot change them ...
    # ... so the resume says what it changed, and where it resumed.
    resume = json.loads(mlflow_store.read_text(run_id, "resumes/step-00000002.json"))
    assert resume["changed"] == {"train.iterations": {"logged": "3", "now": "4"}}  # not train.resume, names, tags
    assert run_.data.tags["ssod.changed_on_resume"] == "train.iterations"
    assert run_.data.tags["ssod.resumed_at_steps"] == "2"
    assert params["data.train_json"] == MASKED and run_.data.tags["database"] == MASKED
    tags = run_.data.tags  # what made the run, where it trained
    assert tags["ssod.torch"] == torch.__version__ and tags["ssod.device"] == "cpu (CPU)" and tags["ssod.processes"] == "1"
    assert tags["ssod.mixed_precision"] == "no"  # the precision used (train.mixed_precision null: the launcher's)
    # Which CPU trained it (runs on CPUs that round differently are not bit-comparable): the
    # tag, and final_metrics.json beside the checkpoints, which the method benchmark copies.
    assert tags["ssod.machine"] == machine_description() and "cores" in tags["ssod.machine"]
    # Strict JSON: an undefined metric (no large objects: APl) is null, never NaN.
    written = json.loads((tmp_path / "outputs" / "final_metrics.json").read_text(), parse_constant=pytest.fail)
    assert written["val/teacher/bbox_APl"] is None
    assert written["machine"] == tags["ssod.machine"] and written["mlflow_run_id"] == run_id
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    repo = Path(__file__).resolve().parents[2]
    if (repo / ".git").exists():
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert tags["mlflow.source.git.commit"] == head

    assert mlflow_store.steps(run_id, "train/loss") == [1, 2, 3, 4]
    for key in ("val/teacher/bbox_AP", "val/student/bbox_AP", "val/teacher/bbox_AP50", "val/student/bbox_AR100"):
        assert sorted(mlflow_store.steps(run_id, key)) == [2, 3, 4], key
    assert mlflow_store.steps(run_id, "train/lr") == [1, 2, 3, 4]
    assert mlflow_store.history(run_id, "train/nonfinite_steps") == {1: [0.0], 2: [0.0], 3: [0.0], 4: [0.0]}
    mlflow_store.assert_no_step_twice(run_id)

    artifacts = mlflow_store.artifacts(run_id)
    assert {"config.yaml", "final_metrics.json"} <= set(artifacts)
    # One copy of the weights: the output folder's; the description says where (MLflow's are opt-in).
    assert not [name for name in artifacts if name.endswith(".pt")] and mlflow_store.logged_models(run_id) == []
    best = tmp_path / "outputs" / "checkpoints" / "best.pt"
    assert f"Weights: `{best}` (step " in tags["mlflow.note.content"] and f"`ssod-eval {tmp_path / 'outputs'}`" in tags["mlflow.note.content"]
    config = mlflow_store.read_text(run_id, "config.yaml")
    assert "secret" not in config and MASKED in config and f"name: {method}" in config
    logged_final = json.loads(mlflow_store.read_text(run_id, "final_metrics.json"))
    assert logged_final["val/teacher/bbox_AP"] == pytest.approx(final["val/teacher/bbox_AP"])
    contexts = {tag.value for entry in run_.inputs.dataset_inputs for tag in entry.tags if tag.key == "mlflow.data.context"}
    names = {entry.dataset.name for entry in run_.inputs.dataset_inputs}
    assert contexts == ({"train", "eval"} if method == "supervised" else {"train", "unlabeled", "eval"})
    assert "synthetic/val.json" in names and len(run_.inputs.dataset_inputs) == len(contexts)
    for entry in run_.inputs.dataset_inputs:  # how many images, from where (this run's): not only a digest
        details = {tag.key: tag.value for tag in entry.tags}
        assert int(details["ssod.images"]) > 0 and Path(details["ssod.image_dir"]).is_dir()

    if method == "supervised":
        assert not any(key.startswith(("pseudo/", "polish/", "train/unsup/")) for key in run_.data.metrics)
    else:
        for key in ("pseudo/num_per_image/raw", "pseudo/recall/raw", "train/unsup/roi_cls"):
            assert mlflow_store.steps(run_id, key) == [1, 2, 3, 4], key
        for step in (2, 3, 4):  # pictures at every evaluation
            assert any(path.startswith(f"pseudo_labels/step_{step:08d}") for path in artifacts), artifacts
    if method == "polish_teacher":
        for key in ("polish/box/iou_before", "polish/box/iou_after", "polish/cls/acc", "train/polish/box"):
            assert mlflow_store.steps(run_id, key) == [1, 2, 3, 4], key

    # The resumed run ends with exactly the weights of 4 straight iterations (CPU): data,
    # augmentation and RNG are restored, and the evaluation at 2 (before checkpoint 2, not
    # done by the straight run) drew nothing from the training's random stream.
    run(make_config("train.iterations=4", "data.val_max_images=4", f"train.output_dir={tmp_path / 'straight'}",
                    "tracking.experiment=straight", method=method))
    resumed, straight = final_checkpoint(tmp_path / "outputs"), final_checkpoint(tmp_path / "straight")
    assert resumed["step"] == straight["step"] == 4
    for part in ("student", "teacher"):
        assert_same_weights(resumed[part], straight[part])
    assert_same_weights(resumed["optimizer"]["state"][0], straight["optimizer"]["state"][0])

    if method == "supervised":
        # Resuming a finished run (a requeued job) trains nothing and reports the same result.
        # on_eval sees that evaluation too: a retried tuning trial completes on it.
        evaluations = []
        again = run(make_config(*SCHEDULE, *secrets, "train.iterations=4", "train.resume=auto", method=method),
                    on_eval=lambda step, metrics: evaluations.append((step, metrics["val/teacher/bbox_AP"])))
        assert again["val/teacher/bbox_AP"] == pytest.approx(final["val/teacher/bbox_AP"])
        assert evaluations == [(4, pytest.approx(final["val/teacher/bbox_AP"]))]
        logged_again = json.loads(mlflow_store.read_text(run_id, "final_metrics.json"))
        assert logged_again["val/teacher/bbox_AP"] == pytest.approx(final["val/teacher/bbox_AP"])
        # ... with the training scalars the run already has, not the evaluation alone.
        assert set(logged_again) == set(logged_final) and set(again) == set(final)
        assert again["train/loss"] == pytest.approx(final["train/loss"])
        assert mlflow_store.only_run().info.status == "FINISHED"
        assert mlflow_store.only_run().data.tags["ssod.resumed_at_steps"] == "2,4"
        mlflow_store.assert_no_step_twice(run_id)


def test_sec_per_iter_is_training_time_and_the_evaluation_has_its_own(make_config, mlflow_store, monkeypatch):
    """An evaluation between two logs is not training time. The training loop's clock is fake:
    it stands still except for a jump of 1000 s during each evaluation (no real waiting), so
    nothing depends on how fast this machine is. Counted as training, the jump would make the
    interval's two iterations 500 s each."""
    import types

    import ssod.loop

    jumped = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: jumped[0])
    real = ssod.loop.evaluate_both

    def slow_evaluation(*args, **kwargs):
        jumped[0] += 1000.0
        return real(*args, **kwargs)

    monkeypatch.setattr(ssod.loop, "time", clock)
    monkeypatch.setattr(ssod.loop, "evaluate_both", slow_evaluation)
    run(make_config("train.iterations=4", "train.eval_every=2", "train.log_every=2", "data.val_max_images=2"))
    run_id = mlflow_store.only_run().info.run_id
    per_iter = mlflow_store.history(run_id, "train/sec_per_iter")
    evaluation = mlflow_store.history(run_id, "val/seconds")
    assert evaluation == {2: [1000.0], 4: [1000.0]}
    assert per_iter == {2: [0.0], 4: [0.0]}  # the interval 3-4 holds none of the evaluation at 2


def _garbage_annotations(data: dict, seed: int) -> dict:
    """The same images with random boxes and labels (valid categories, other counts)."""
    rng = random.Random(seed)
    category_ids = [category["id"] for category in data["categories"]]
    annotations = []
    for image in data["images"]:
        for _ in range(rng.randint(0, 6)):
            x, y = rng.uniform(0, image["width"] - 8), rng.uniform(0, image["height"] - 8)
            w, h = rng.uniform(4, image["width"] - x), rng.uniform(4, image["height"] - y)
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": rng.choice(category_ids),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    return {**data, "annotations": annotations}


@pytest.mark.slow
def test_the_hidden_ground_truth_of_unlabeled_images_never_reaches_training(make_config, dataset_cache: Path, tmp_path: Path):
    """Issue 3: replacing the unlabeled json's annotations by garbage changes no weight."""
    paths = ensure_synthetic(dataset_cache / "synthetic", SyntheticRecipe(num_train=40, num_val=8))
    make_split(paths.train_json, tmp_path / "splits", fold=1, percent=10.0, seed=0)
    labeled, unlabeled = split_paths(paths.train_json, tmp_path / "splits", 1, 10.0)
    garbage = tmp_path / "garbage-unlabeled.json"
    real = json.loads(unlabeled.read_text())
    garbage.write_text(json.dumps(_garbage_annotations(real, seed=1)))
    assert json.loads(garbage.read_text())["annotations"] != real["annotations"]

    weights = {}
    for name, unlabeled_json in (("real", unlabeled), ("garbage", garbage)):
        run(make_config(
            "data.name=coco", f"data.train_json={labeled}", f"data.train_images={paths.train_images}",
            f"data.unlabeled_json={unlabeled_json}", f"data.val_json={paths.val_json}", f"data.val_images={paths.val_images}",
            "data.val_max_images=2", "train.iterations=2", f"train.output_dir={tmp_path / name}",
            "method.pseudo_label_initial_score_thr=0.0",  # an untrained teacher: keep all its boxes
            method="polish_teacher",
        ))
        weights[name] = final_checkpoint(tmp_path / name)
    for part in ("student", "teacher"):
        assert_same_weights(weights["real"][part], weights["garbage"][part])


@pytest.mark.slow
def test_burn_in_then_ramp_on_the_pretrained_model_resumes_like_a_straight_run(make_config, mlflow_store, tmp_path: Path):
    """The main job's shape: EfficientNet-Lite0 (ImageNet), 2 supervised burn-in steps, a
    2-step ramp of the unsupervised weight; a resume inside the ramp ends bit-identical."""
    recipe = ("method.unsup_start=2", "method.unsup_warmup=2",
              "method.pseudo_label_initial_score_thr=0.0", "train.ckpt_every=3", "train.keep_checkpoints=5",
              "data.val_max_images=2")
    run(make_config(*recipe, "train.iterations=3", **LITE0))
    run(make_config(*recipe, "train.iterations=5", "train.resume=auto", **LITE0))
    run_id = mlflow_store.only_run().info.run_id
    weight = mlflow_store.history(run_id, "train/unsup_weight")
    # The synthetic recipe's weight for Polishing Teacher (conf/experiment_method/): 0.3503.
    assert {step: values[0] for step, values in weight.items()} == pytest.approx(
        {1: 0.0, 2: 0.0, 3: 0.3503 / 2, 4: 0.3503, 5: 0.3503})
    # No unlabeled batch during the burn-in: pseudo-label figures only from step 3 on.
    assert mlflow_store.steps(run_id, "pseudo/num_per_image/raw") == [3, 4, 5]
    assert mlflow_store.steps(run_id, "train/unsup/roi_cls") == [3, 4, 5]

    run(make_config(*recipe, "train.iterations=5", f"train.output_dir={tmp_path / 'straight'}",
                    "tracking.experiment=straight", **LITE0))
    resumed, straight = final_checkpoint(tmp_path / "outputs"), final_checkpoint(tmp_path / "straight")
    for part in ("student", "teacher"):
        assert_same_weights(resumed[part], straight[part])


def tiny_test_split(dataset_cache: Path):
    """The tiny synthetic test split's ground truth (3 images)."""
    (path,) = [p for p in dataset_cache.rglob("annotations/test.json") if len(json.loads(p.read_text())["images"]) == 3]
    return coco_from_dataset(json.loads(path.read_text()))


@pytest.mark.slow
def test_init_continue_goes_on_with_the_burn_in_schedule_in_a_new_run_and_reports_the_held_out_test_set(
        make_config, mlflow_store, tmp_path: Path, caplog, dataset_cache: Path):
    """The method benchmark's shape: a polish_teacher burn-in, then another method continuing
    its schedule (step, learning rate, EMA counters) as a new MLflow run in its own folder;
    the test split is evaluated once, at the end, and never before."""
    caplog.set_level("INFO")  # the console's level under ssod-train (Hydra's job logging)
    schedule = ("train.lr_steps=[3]", "train.lr_gamma=0.1", "train.warmup_iters=0", "data.val_max_images=2",
                "data.synthetic.num_test=3")
    # The burn-in skips the test split, as the method benchmark's and a study's do.
    run(make_config(*schedule, "train.iterations=3", "method.unsup_start=3", "train.evaluate_test=false",
                    method="polish_teacher"))
    burn_in = mlflow_store.only_run()
    burn_in_checkpoint = final_checkpoint(tmp_path / "outputs")
    # Every method carries the burn-in's momentum for each parameter it shares with it (all of
    # its own): supervised, without polishing networks, exactly as polish_teacher.
    for method, folder in (("polish_teacher", "pt"), ("supervised", "sup")):
        caplog.clear()
        run(make_config(*schedule, "train.iterations=5", "method.unsup_start=3", f"train.run_name={folder}",
                        f"train.output_dir={tmp_path / folder}", f"train.init_from={tmp_path / 'outputs'}",
                        "train.init_continue=true", method=method))
        continued = [r for r in mlflow_store.runs() if r.info.run_name == folder][0]
        assert continued.info.run_id != burn_in.info.run_id
        assert mlflow_store.steps(continued.info.run_id, "train/loss") == [4, 5]
        carried = [r.getMessage() for r in caplog.records if "SGD momentum carried" in r.getMessage()]
        assert len(carried) == 1 and re.search(r"carried for (\d+) of \1 parameters", carried[0]), carried
        # Past the lr step at 3: the burn-in's schedule, not a restart at the peak (or a warmup).
        assert mlflow_store.history(continued.info.run_id, "train/lr")[5] == [pytest.approx(0.001)]
        final = final_checkpoint(tmp_path / folder)
        assert final["step"] == 5 and final["ema_steps"] == burn_in_checkpoint["ema_steps"] + 2
        assert mlflow_store.steps(continued.info.run_id, "test/teacher/bbox_AP") == [5]
        # The test detections are kept: re-accumulated, they give the logged test AP exactly.
        for who in ("teacher", "student"):
            image_ids, results = read_detections(tmp_path / folder / "test_detections" / f"{who}.json.gz")
            logged = mlflow_store.history(continued.info.run_id, f"test/{who}/bbox_AP")[5][0]
            assert len(image_ids) == 3
            ap = ImageMatches.from_coco(tiny_test_split(dataset_cache), results, image_ids).ap()
            assert ap == pytest.approx(logged, abs=1e-12) if not math.isnan(logged) else math.isnan(ap)
        assert mlflow_store.steps(continued.info.run_id, "val/teacher/bbox_AP")[-1] == 5
    assert mlflow_store.steps(burn_in.info.run_id, "test/student/bbox_AP") == []
    assert not (tmp_path / "outputs" / "test_detections").exists()
    # The run's log lines beside its checkpoints and in MLflow.
    console = (tmp_path / "sup" / "console.log").read_text()
    assert "finished at step 5" in console and "held-out test set: teacher AP" in console
    supervised = [r for r in mlflow_store.runs() if r.info.run_name == "sup"][0]
    assert "held-out test set" in mlflow_store.read_text(supervised.info.run_id, "console.log")
    assert "test/teacher/bbox_AP" not in mlflow_store.client.get_run(burn_in.info.run_id).data.metrics


def test_the_logged_model_loads_back_with_mlflow_registers_and_detects_as_the_checkpoint_does(
    make_config, mlflow_store, tmp_path: Path, monkeypatch
):
    """The run's MLflow logged model (the teacher detector) loads with MLflow's own API, in
    a process that has never built the model, is registered under the configured name, and
    gives the same detections as the teacher rebuilt from the final checkpoint."""
    import mlflow.pytorch
    from omegaconf import OmegaConf

    from ssod.inference import checkpoint_config, load_detector
    from ssod.models.detector import build_detector

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # tracking.system_metrics=null follows it
    cfg = make_config("train.iterations=2", "tracking.registered_model_name=ssod-test-detector", method="polish_teacher")
    run(cfg)
    [finished] = mlflow_store.runs()
    assert not [key for key in finished.data.metrics if key.startswith("system/")]
    assert finished.data.tags["mlflow.note.content"].startswith("**Polishing Teacher** on `synthetic`, 10% labeled")
    assert "Finished at step 2: teacher AP" in finished.data.tags["mlflow.note.content"]
    [output] = finished.outputs.model_outputs
    # A registered name logs the model although tracking.log_model is off by default.
    assert [model.model_id for model in mlflow_store.logged_models(finished.info.run_id)] == [output.model_id]
    version = mlflow_store.client.get_model_version("ssod-test-detector", "1")
    assert version.source == f"models:/{output.model_id}" and version.run_id == finished.info.run_id

    # MLflow's fluent API reads the process-wide URI: set for this test only.
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", mlflow_store.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store.uri)
    model = mlflow.pytorch.load_model("models:/ssod-test-detector/1")
    metadata = mlflow.models.get_model_info(f"models:/{output.model_id}").metadata
    assert metadata["weights"] == "teacher" and metadata["categories"]["names"][:2] == ["circle", "ring"]
    checkpoint = load_checkpoint(list_checkpoints(tmp_path / "outputs" / "checkpoints")[-1][1])
    rebuilt = build_detector(OmegaConf.to_object(checkpoint_config(checkpoint, []).model), num_classes=10)
    load_detector(rebuilt, checkpoint["teacher"], "the final checkpoint")
    image = torch.rand(3, 120, 100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logged, own = model.eval()([image])[0], rebuilt.eval()([image])[0]
    assert set(logged) == {"boxes", "scores", "labels"}
    for key in logged:
        assert torch.equal(logged[key], own[key]), key
