"""Training-step speed of the CPU recipes: fp32 vs bf16 autocast, contiguous vs channels_last.

Run by hand; results go to BENCHMARKS.md with the command. All variants are measured in one run, interleaved,
and reported as ratios to fp32/contiguous, because the machines are shared and absolute times drift.

    .venv/bin/python bench/train_step_speed.py --backbone mobilenetv2_100 --image-size 96 --batch 32
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import timm
import torch


def step_time(model: torch.nn.Module, images: torch.Tensor, bf16: bool, optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(images).float().square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant (after 2 warm-up steps)")
    args = parser.parse_args()
    torch.manual_seed(0)
    variants = list(itertools.product((False, True), (False, True)))  # (bf16, channels_last)
    setups = {}
    for bf16, channels_last in variants:
        model = timm.create_model(args.backbone, num_classes=0).train()
        images = torch.randn(args.batch, 3, args.image_size, args.image_size)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(2):
            step_time(model, images, bf16, optimizer)
        setups[(bf16, channels_last)] = (model, images, optimizer)
    times: dict[tuple[bool, bool], list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):  # interleaved, so drift in machine load hits every variant alike
        for variant, (model, images, optimizer) in setups.items():
            times[variant].append(step_time(model, images, variant[0], optimizer))
    base = statistics.median(times[(False, False)])
    print(f"{args.backbone}, {args.image_size} px, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| precision | memory format | median step (s) | speed vs fp32 contiguous |")
    print("|---|---|---|---|")
    for (bf16, channels_last), values in times.items():
        median = statistics.median(values)
        print(f"| {'bf16 autocast' if bf16 else 'fp32'} | {'channels_last' if channels_last else 'contiguous'} | "
              f"{median:.3f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
