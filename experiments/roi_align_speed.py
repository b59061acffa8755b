"""RoIAlign on the CPU: torchvision's kernel against the gathered sum of ``ssod.models.roi_align``.

Two cases of a Polishing Teacher step at the CPU benchmark settings (64 FPN channels,
4 images of about 190 px, so P2 maps of about 48x48): the student's RoI head (512 boxes
over four levels, forward and backward) and the polishing networks' pooling (2,500 boxes,
forward only: their features are detached). Medians of alternating calls, and the
largest difference from torchvision's values::

    .venv/bin/python experiments/roi_align_speed.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.ops import MultiScaleRoIAlign

from ssod.models.roi_align import PyramidRoIAlign


def _case(boxes_per_image: int, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    # P2 to P5 of 192-px images: strides 4 to 32.
    sides = [192 // 4 // 2**k for k in range(4)]
    features = {name: torch.randn(4, 64, side, side, generator=generator) for name, side in zip("0123", sides)}
    boxes = []
    for _ in range(4):
        corner = torch.rand(boxes_per_image, 2, generator=generator) * 150
        boxes.append(torch.cat([corner, corner + 4 + torch.rand(boxes_per_image, 2, generator=generator) * 120], dim=1))
    return features, boxes


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    sizes = [(192, 192)] * 4
    poolers = {"torchvision": MultiScaleRoIAlign(list("0123"), 7, 2), "gathered": PyramidRoIAlign(list("0123"), 7, 2)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} alternating calls (ms)\n")
    print("| case | torchvision | gathered | speed-up | max abs difference |\n| --- | --- | --- | --- | --- |")
    cases = (("student RoI head, 512 boxes, forward + backward", 128, True), ("polishing, 2,500 boxes, forward", 625, False))
    for label, per_image, backward in cases:
        features, boxes = _case(per_image, generator)
        features = {name: f.requires_grad_(backward) for name, f in features.items()}
        cotangent = torch.randn(4 * per_image, 64, 7, 7, generator=generator)
        outputs = {}

        def call(name):
            pooled = poolers[name](features, boxes, sizes)
            if backward:
                torch.autograd.grad(pooled, list(features.values()), cotangent)
            outputs[name] = pooled.detach()

        for name in poolers:  # warm-up
            call(name)
        times: dict[str, list[float]] = {name: [] for name in poolers}
        for _ in range(args.repeats):
            for name in poolers:
                times[name] += _time(lambda: call(name), 1)
        median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        difference = (outputs["gathered"] - outputs["torchvision"]).abs().max().item()
        print(f"| {label} | {median['torchvision']:.1f} | {median['gathered']:.1f} | "
              f"{median['torchvision'] / median['gathered']:.1f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
