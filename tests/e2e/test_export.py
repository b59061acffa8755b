"""``ssod-export``: a training checkpoint's teacher as TorchScript and ONNX, each run back
(torch.jit.load, onnxruntime) and compared with the PyTorch detector."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ssod.data.pipeline import resolve_files
from ssod.export import check_image, compare_boxes, main
from ssod.training import run


@pytest.fixture
def trained(make_config, tmp_path: Path):
    """A polish_teacher checkpoint of 2 steps and a validation image (a few boxes pass 0.05)."""
    cfg = make_config("train.iterations=2", "model.box_score_thresh=0.02", method="polish_teacher")
    run(cfg)
    image = sorted(resolve_files(OmegaConf.to_object(cfg.data), tmp_path).val_images.glob("*.jpg"))[0]
    return cfg, tmp_path / "outputs", image


def test_exported_files_give_the_pytorch_detectors_boxes(trained, tmp_path: Path, capsys):
    cfg, outputs, image = trained
    out = tmp_path / "exported"
    assert main([str(outputs), "--image", str(image), "--out", str(out)]) == 0
    record = json.loads((out / "detector.json").read_text())
    assert record["input"]["short_side"] == cfg.data.test_size and record["weights"] == "teacher"
    for name in ("torchscript", "onnx"):
        check = record["check"][name]
        assert check["passed"] and check["unmatched"] == 0 and check["boxes"] > 0, check
        assert check["max_box_diff_px"] <= 0.01
        assert (out / check["file"]).stat().st_size == check["bytes"] > 100_000
    printed = capsys.readouterr().out
    assert "torchscript" in printed and "onnx" in printed and "FAILED" not in printed

    # Read back by their own runtimes on another image size: the files take any H and W.
    tensor = check_image(image, cfg.data.test_size + 32, cfg.data.test_max_size + 64)
    scripted = torch.jit.load(str(out / "detector.torchscript.pt"))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "detector.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        boxes, scores, labels = scripted(tensor)
    onnx_boxes, onnx_scores, onnx_labels = session.run(None, {"image": tensor.numpy()})
    found = compare_boxes({"boxes": boxes, "scores": scores, "labels": labels},
                          {"boxes": torch.from_numpy(onnx_boxes), "scores": torch.from_numpy(onnx_scores),
                           "labels": torch.from_numpy(onnx_labels)}, tolerance=0.01)
    assert found["passed"] and found["boxes"] > 0, found
    assert boxes.shape[1] == 4 and labels.dtype == torch.int64
    assert bool((labels >= 1).all()) and int(labels.max()) <= len(record["categories"]["names"])


def test_a_missing_image_is_one_line(trained, tmp_path: Path, capsys):
    _, outputs, _ = trained
    capsys.readouterr()
    assert main([str(outputs), "--image", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "x"),
                 "--format", "torchscript"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ssod-export: error: {tmp_path / 'nope.jpg'}: no such image (--image)"]


def test_the_check_fails_on_a_moved_box_or_a_missing_one():
    expected = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [70.0, 5.0, 90.0, 30.0]]),
                "scores": torch.tensor([0.9, 0.6]), "labels": torch.tensor([1, 2])}
    assert compare_boxes(expected, expected, 0.01)["passed"]
    moved = {**expected, "boxes": expected["boxes"] + torch.tensor([[0.0, 0.0, 0.5, 0.0], [0.0] * 4])}
    result = compare_boxes(expected, moved, 0.01)
    assert not result["passed"] and result["max_box_diff_px"] == pytest.approx(0.5)
    missing = {key: value[:1] for key, value in expected.items()}
    assert compare_boxes(expected, missing, 0.01)["unmatched"] == 1
    relabelled = {**expected, "labels": torch.tensor([1, 1])}
    assert compare_boxes(expected, relabelled, 0.01)["unmatched"] == 2


def test_onnx_without_onnxruntime_is_one_line_naming_it(trained, tmp_path: Path, capsys, monkeypatch):
    import importlib.util

    _, outputs, image = trained
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    capsys.readouterr()
    assert main([str(outputs), "--image", str(image), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs onnxruntime: pip install onnxruntime" in err[0]
    assert not (tmp_path / "x").exists()  # refused before any work
