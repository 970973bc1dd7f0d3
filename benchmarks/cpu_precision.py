"""Training speed of chapter 03's step on this CPU: fp32 and bf16 autocast, channels-last and contiguous.

    python benchmarks/cpu_precision.py            # --help for options; a few minutes on 2 CPU cores

One training step is a forward and backward pass of the U-Net/ResNet34 on a batch of
random 256 px images (DiceBCE, Adam), as in ``lungseg_utils.train``, which uses the
channels-last memory layout; fp32 is also timed in the default (contiguous) layout.
The first step of each precision is a warm-up and is not counted. It prints whether
the CPU has native bf16 (AVX512-BF16 or AMX-BF16), which is what
``lungseg_utils.autocast_dtype`` uses to choose bf16 or fp32 on a CPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lungseg_utils as L  # noqa: E402


def images_per_second(
    dtype: torch.dtype | None, steps: int, batch: int, size: int, layout: torch.memory_format = torch.channels_last
) -> float:
    """Training images per second over ``steps`` timed steps (after one warm-up step)."""
    torch.manual_seed(0)
    model = L.build_model("resnet34", weights=None).to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = L.DiceBCELoss()
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    masks = (torch.rand(batch, 1, size, size) > 0.5).float()
    timed = 0.0
    for step in range(steps + 1):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = model(images)
        loss = loss_fn(logits.float(), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step:
            timed += time.perf_counter() - started
    return batch * steps / timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--no-bf16", action="store_true", help="skip bf16 (minutes per step on a CPU without native bf16)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"CPU capability seen by PyTorch: {torch.backends.cpu.get_cpu_capability()}; "
          f"native bf16: {L.cpu_has_native_bf16()}; threads: {torch.get_num_threads()}; torch {torch.__version__}")
    runs = (("fp32, channels-last", None, torch.channels_last), ("fp32, contiguous", None, torch.contiguous_format),
            ("bf16 autocast, channels-last", torch.bfloat16, torch.channels_last))
    for name, dtype, layout in runs[:2] if args.no_bf16 else runs:
        print(f"{name:29s} {images_per_second(dtype, args.steps, args.batch, args.size, layout):6.2f} training images/s "
              f"({args.size} px, batch {args.batch}, {args.steps} timed steps)", flush=True)
    print(f"lungseg_utils.autocast_dtype chooses on this CPU: {L.autocast_dtype(torch.device('cpu')) or 'fp32'}")


if __name__ == "__main__":
    main()
