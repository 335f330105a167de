"""Training-step time of the DeepLabV3 backbones, as ratios to torchvision's MobileNetV3 model.

    python -m benchmarks.backbones [--threads N] [--batch 8] [--size 256] [--repeat 3]
        [--json PATH] [BACKBONE ...]

One training step (forward under bf16 autocast where the CPU runs it natively, cross-entropy,
backward, AdamW) on random channels-last input, for each backbone of ``shared.model`` in turns
(:func:`benchmarks.common.time_interleaved`), so load on a shared machine slows them alike.
The first backbone listed is the baseline of the ratios (default: ``mobilenet_v3_large``).
FLOPs per image (forward) come from ``torch.utils.flop_counter``: they show where the time
goes and where it does not (depthwise convolutions are memory-bound on CPUs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import describe, machine, markdown_table, time_interleaved, write_json
from shared.cpu import cpu_bf16_is_fast
from shared.model import BACKBONE_IDS, BACKBONES, build_model

DEFAULT = (
    "mobilenet_v3_large",
    "mobilenet_v3_large_deeplabv3plus_s4_aspp960",
    "mobilenet_v3_large_deeplabv3plus_s2_aspp960",
    "mobilenet_v3_large_deeplabv3plus_s1_aspp960",
    "mobilenet_v3_large_deeplabv3plus_s1_aspp160",
    "mobilenet_v3_large_os8",
)


def training_step(backbone: str, batch: int, size: int) -> Callable[[], None]:
    """A closure running one training step of ``backbone`` on fixed random data."""
    torch.manual_seed(0)
    model = build_model(backbone, num_classes=3).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, 3, (batch, size, size))
    bf16 = cpu_bf16_is_fast()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)["out"]
        loss = nn.functional.cross_entropy(logits.float(), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def forward_gflops(backbone: str, size: int) -> float:
    """Forward FLOPs of one ``size`` x ``size`` image, in GFLOPs (a multiply-add counts 2)."""
    model = build_model(backbone, num_classes=3).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def run(backbones: Sequence[str], *, batch: int, size: int, repeat: int) -> dict[str, Any]:
    steps = {name: training_step(name, batch, size) for name in backbones}
    timings = time_interleaved(steps, repeat=repeat, warmup=1)
    base = timings[backbones[0]].median
    rows = []
    for name in backbones:
        median = timings[name].median
        rows.append(
            {
                "backbone": name,
                "step_s": timings[name].to_dict(),
                "images_per_s": batch / median,
                "step_time_over_baseline": median / base,
                "forward_gflops_per_image": forward_gflops(name, size),
            }
        )
    return {"batch": batch, "size": size, "baseline": backbones[0], "backbones": rows}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backbones", description=__doc__)
    parser.add_argument("backbones", nargs="*", default=list(DEFAULT), metavar="BACKBONE")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    unknown = [b for b in args.backbones if b not in BACKBONE_IDS]
    if unknown:
        parser.error(f"unknown backbone(s) {', '.join(unknown)}; allowed: {', '.join(BACKBONES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.backbones, batch=args.batch, size=args.size, repeat=args.repeat)
    result["machine"] = machine()
    print(describe(result["machine"]))
    print(
        markdown_table(
            ["backbone", "s/step (median)", "images/s", "x baseline", "forward GFLOPs/image"],
            [
                [
                    r["backbone"],
                    r["step_s"]["median_s"],
                    r["images_per_s"],
                    r["step_time_over_baseline"],
                    r["forward_gflops_per_image"],
                ]
                for r in result["backbones"]
            ],
        )
    )
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
