"""COCO json -> torchvision targets: category map, boxes, filtering, errors, image modes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssod.data.coco import (
    CategoryMap,
    CocoDetection,
    DatasetError,
    box_counts,
    annotations_to_target,
    list_collate,
    load_coco,
    load_split,
    read_rgb,
)

WIDTH, HEIGHT = 40, 30
# Non-contiguous ids, listed out of order, as real COCO json may be.
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 7, "name": "train"}]


def _ann(image_id: int, category_id: int, bbox, iscrowd: int = 0, ann_id: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd,
            "area": bbox[2] * bbox[3]}


def _write(tmp_path: Path, data, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _dataset_json(annotations: list[dict], num_images: int = 3) -> dict:
    images = [{"id": i, "file_name": f"{i}.png", "width": WIDTH, "height": HEIGHT} for i in range(1, num_images + 1)]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def _images(tmp_path: Path, num_images: int = 3) -> Path:
    directory = tmp_path / "images"
    directory.mkdir(exist_ok=True)
    for i in range(1, num_images + 1):
        pixels = np.full((HEIGHT, WIDTH, 3), 20 * i, dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"{i}.png")
    return directory


def _category_map() -> CategoryMap:
    return CategoryMap((1, 7, 90), ("person", "train", "toothbrush"))


def test_category_map_sorts_ids_and_round_trips(tmp_path: Path):
    coco = load_coco(_write(tmp_path, _dataset_json([])))
    category_map = CategoryMap.from_coco(coco)
    assert category_map == _category_map()
    assert category_map.num_classes == 3
    assert category_map.category_id_to_label == {1: 1, 7: 2, 90: 3}
    assert category_map.label_to_category_id == {1: 1, 2: 7, 3: 90}
    for category_id, label in category_map.category_id_to_label.items():
        assert category_map.label_to_category_id[label] == category_id


def test_splits_with_other_categories_are_refused(tmp_path: Path):
    images = _images(tmp_path)
    first = load_split(_write(tmp_path, _dataset_json([]), "a.json"), images, None, lambda *a: a)
    other = _dataset_json([])
    other["categories"] = CATEGORIES[:2]
    with pytest.raises(DatasetError, match="b.json: its categories differ"):
        load_split(_write(tmp_path, other, "b.json"), images, first.category_map, lambda *a: a)


def test_boxes_go_from_xywh_to_xyxy_with_contiguous_labels():
    anns = [_ann(1, 7, [1.0, 2.0, 10.0, 5.0]), _ann(1, 90, [0.5, 0.0, 3.0, 4.0])]
    target, dropped = annotations_to_target(anns, _category_map(), WIDTH, HEIGHT)
    assert torch.equal(target["boxes"], torch.tensor([[1.0, 2.0, 11.0, 7.0], [0.5, 0.0, 3.5, 4.0]]))
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [2, 3]
    assert dropped == 0


def test_crowd_boxes_are_ignored_and_not_counted_as_dropped():
    anns = [_ann(1, 1, [1, 1, 5, 5], iscrowd=1), _ann(1, 7, [2, 2, 4, 4])]
    target, dropped = annotations_to_target(anns, _category_map(), WIDTH, HEIGHT)
    assert target["labels"].tolist() == [2] and dropped == 0
    only_crowd, dropped = annotations_to_target(anns[:1], _category_map(), WIDTH, HEIGHT)
    assert only_crowd["boxes"].shape == (0, 4) and only_crowd["labels"].shape == (0,) and dropped == 0


def test_voc_difficult_and_ignored_objects_are_left_out_of_training_targets():
    """As the reference trains (mmdetection skips ``ignore``, its VOC converter's mark for
    difficult objects); COCOeval reads the json itself and still counts them."""
    anns = [{**_ann(1, 1, [1, 1, 5, 5]), "difficult": 1}, {**_ann(1, 1, [2, 2, 5, 5]), "ignore": 1},
            {**_ann(1, 7, [2, 2, 4, 4]), "difficult": 0}]
    target, dropped = annotations_to_target(anns, _category_map(), WIDTH, HEIGHT)
    assert target["labels"].tolist() == [2] and dropped == 0


def test_boxes_are_clipped_and_degenerate_ones_dropped_and_counted():
    anns = [
        _ann(1, 1, [-5, -5, 15, 15]),  # clipped to [0, 0, 10, 10]
        _ann(1, 1, [30, 20, 50, 50]),  # clipped to the image corner
        _ann(1, 7, [3, 3, 0, 10]),  # zero width
        _ann(1, 7, [3, 3, 10, -1]),  # negative height
        _ann(1, 7, [WIDTH + 5, 3, 10, 10]),  # entirely right of the image: zero width after clipping
        _ann(1, 90, [math.nan, 3, 10, 10]),  # not a number
    ]
    target, dropped = annotations_to_target(anns, _category_map(), WIDTH, HEIGHT)
    assert target["boxes"].tolist() == [[0, 0, 10, 10], [30, 20, WIDTH, HEIGHT]]
    assert target["labels"].tolist() == [1, 1]
    assert dropped == 4


def test_boxes_reaching_past_the_border_are_counted_at_start(tmp_path: Path):
    anns = [
        _ann(1, 1, [-5, -5, 15, 15], ann_id=1),  # cut at the top left
        _ann(1, 1, [-500, -500, 2000, 2000], ann_id=2),  # far outside: becomes the whole image
        _ann(1, 7, [0.5, 0, WIDTH, HEIGHT], ann_id=3),  # overshoots by rounding only: not counted
        _ann(1, 7, [WIDTH + 5, 3, 10, 10], ann_id=4),  # wholly outside: degenerate, not clipped
        _ann(2, 7, [3, 3, 10, 10], ann_id=5),
    ]
    coco = load_coco(_write(tmp_path, _dataset_json(anns)))
    assert box_counts(coco, [1, 2, 3]) == (4, 1, 2)
    assert box_counts(coco, [2]) == (1, 0, 0)


def test_an_image_file_of_another_size_than_the_json_says_is_skipped_and_named(tmp_path: Path):
    coco = load_coco(_write(tmp_path, _dataset_json([_ann(2, 1, [1, 1, 5, 5])])))
    images = _images(tmp_path)
    Image.new("RGB", (1, 1)).save(images / "2.png")  # declared 40x30
    dataset = CocoDetection(coco, images, _category_map(), lambda image, target, generator: image)
    image, meta = dataset[(1, 0)]
    assert meta["image_id"] == 3 and meta["bad_image_ids"] == [2]
    (entry,) = meta["bad_files"]
    assert entry.startswith(f"{images / '2.png'}: the file is 1x1 but {tmp_path / 'data.json'} says 40x30")
    assert "boxes would not line up" in entry


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "annotation file not found"),
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"annotations": [], "categories": []}, "no 'images' list"),
        ({"images": [{"id": 1, "file_name": "1.png"}], "annotations": []}, "no 'categories' list"),
        ({"images": [], "annotations": [], "categories": CATEGORIES}, "the 'images' list is empty"),
        (_dataset_json([_ann(1, 3, [1, 1, 5, 5])]), r"category ids \[3\] not in 'categories'"),
        (_dataset_json([_ann(9, 1, [1, 1, 5, 5])]), r"unknown image ids \[9\]"),
        # pycocotools would keep the last entry: one image's boxes paired with another file.
        ({**_dataset_json([]), "images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}]},
         r"duplicate image ids \[1\]"),
    ],
)
def test_load_errors_name_the_file_and_the_problem(tmp_path: Path, content, message: str):
    path = tmp_path / "broken.json"
    if content is not None:
        _write(tmp_path, content, "broken.json")
    with pytest.raises(DatasetError, match=message) as caught:
        load_coco(path)
    assert str(path) in str(caught.value)


def test_a_missing_image_directory_is_an_error_naming_it(tmp_path: Path):
    coco = load_coco(_write(tmp_path, _dataset_json([])))
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nowhere'}: image directory not found"):
        CocoDetection(coco, tmp_path / "nowhere", _category_map(), lambda *a: a)


def test_images_without_annotations_are_kept_or_dropped_by_option(tmp_path: Path):
    anns = [_ann(1, 1, [1, 1, 5, 5], ann_id=1), _ann(2, 1, [1, 1, 5, 5], iscrowd=1, ann_id=2)]
    coco = load_coco(_write(tmp_path, _dataset_json(anns)))
    images = _images(tmp_path)
    kept = CocoDetection(coco, images, _category_map(), lambda image, target, generator: target)
    assert kept.image_ids == [1, 2, 3]
    target, _ = kept[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    dropped = CocoDetection(coco, images, _category_map(), lambda *a: a, keep_images_without_annotations=False)
    assert dropped.image_ids == [1]  # image 2 has only a crowd box
    no_boxes = load_coco(_write(tmp_path, _dataset_json([]), "none.json"))
    with pytest.raises(DatasetError, match="none.json: no images left"):
        CocoDetection(no_boxes, images, _category_map(), lambda *a: a, keep_images_without_annotations=False)


def test_the_dataset_counts_dropped_boxes_and_reports_meta(tmp_path: Path):
    anns = [_ann(1, 1, [1, 1, 5, 5], ann_id=1), _ann(1, 7, [2, 2, 0, 5], ann_id=2)]
    coco = load_coco(_write(tmp_path, _dataset_json(anns)))
    dataset = CocoDetection(coco, _images(tmp_path), _category_map(), lambda image, target, generator: (image, target))
    (image, target), meta = dataset[(0, 3)]
    assert image.dtype == torch.uint8 and image.shape == (3, HEIGHT, WIDTH)
    assert target["labels"].tolist() == [1] and target["image_id"] == 1
    assert meta == {"image_id": 1, "size": (HEIGHT, WIDTH), "path": str(tmp_path / "images" / "1.png"), "bad_files": [],
                    "bad_image_ids": []}
    assert dataset.degenerate_dropped == 1


def test_a_sample_is_reproducible_from_its_seed_and_leaves_the_global_rng_alone(tmp_path: Path):
    coco = load_coco(_write(tmp_path, _dataset_json([])))

    def view(image, target, generator):
        return torch.rand(2, generator=generator), torch.rand(2)  # a generator draw and a global draw

    dataset = CocoDetection(coco, _images(tmp_path), _category_map(), view)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first, _ = dataset[(1, 42)]
    assert torch.equal(torch.get_rng_state(), before)
    second, _ = dataset[(1, 42)]
    third, _ = dataset[(1, 43)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], third[0]) and not torch.equal(first[1], third[1])


def test_a_sample_leaves_the_accelerators_generators_alone(tmp_path: Path, monkeypatch):
    """Loaded in the training process (``num_workers=0``), a sample must not reseed the
    GPU's generator: torchvision's RPN and RoI samplers draw from it every step, and the
    loader restores only the CPU generator. (``torch.manual_seed`` seeds every device.)"""
    coco = load_coco(_write(tmp_path, _dataset_json([])))
    dataset = CocoDetection(coco, _images(tmp_path), _category_map(), lambda image, target, generator: torch.rand(2))
    seeded = []
    for device in (torch.cuda, torch.xpu, torch.mps):
        monkeypatch.setattr(device, "manual_seed_all" if hasattr(device, "manual_seed_all") else "manual_seed",
                            lambda seed, name=device.__name__: seeded.append(name))
    first, _ = dataset[(1, 42)]
    assert seeded == []
    assert torch.equal(first, dataset[(1, 42)][0])  # still reproducible from the seed


def test_unreadable_images_are_skipped_and_reported(tmp_path: Path):
    coco = load_coco(_write(tmp_path, _dataset_json([])))
    images = _images(tmp_path)
    raw = (images / "2.png").read_bytes()
    (images / "2.png").write_bytes(raw[: len(raw) // 2])  # truncated
    (images / "3.png").unlink()  # missing
    dataset = CocoDetection(coco, images, _category_map(), lambda image, target, generator: image)
    image, meta = dataset[(1, 0)]
    assert meta["image_id"] == 1  # index 1 and 2 unreadable: wrapped around to the first image
    assert [entry.split(":")[0] for entry in meta["bad_files"]] == [str(images / "2.png"), str(images / "3.png")]
    items, metas = list_collate([dataset[(0, 0)], dataset[(1, 0)]])
    assert len(items) == 2 and [m["image_id"] for m in metas] == [1, 1]
    (images / "1.png").write_bytes(b"garbage")  # now none is readable
    with pytest.raises(DatasetError, match="unreadable images in a row"):
        dataset[(0, 0)]


def _save(path: Path, image: Image.Image) -> Path:
    image.save(path)
    return path


def test_image_modes_are_converted_to_rgb(tmp_path: Path):
    sixteen = np.zeros((HEIGHT, WIDTH), dtype=np.uint16)
    sixteen[0, 0], sixteen[0, 1] = 65535, 32768
    cases = {
        "cmyk.jpg": Image.new("CMYK", (WIDTH, HEIGHT), (0, 255, 255, 0)),  # red in CMYK
        "gray.png": Image.new("L", (WIDTH, HEIGHT), 77),
        "rgba.png": Image.new("RGBA", (WIDTH, HEIGHT), (10, 20, 30, 0)),
        "palette.png": Image.new("P", (WIDTH, HEIGHT)),
        "sixteen.png": Image.fromarray(sixteen),
    }
    decoded = {name: read_rgb(_save(tmp_path / name, image)) for name, image in cases.items()}
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK" and Image.open(tmp_path / "sixteen.png").mode == "I;16"
    for image in decoded.values():
        assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.uint8
    assert decoded["cmyk.jpg"][:, 5, 5].tolist()[0] > 200 and decoded["cmyk.jpg"][1:, 5, 5].max() < 50
    assert decoded["gray.png"][:, 0, 0].tolist() == [77, 77, 77]
    assert decoded["rgba.png"][:, 0, 0].tolist() == [10, 20, 30]
    # 16 bits scaled to 8, not clipped at 255: full scale stays white, half scale is mid grey.
    assert decoded["sixteen.png"][:, 0, 0].tolist() == [255] * 3
    assert decoded["sixteen.png"][:, 0, 1].tolist() == [128] * 3
