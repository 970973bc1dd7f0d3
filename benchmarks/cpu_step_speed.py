"""Time one training step of chapter 03's model on the CPU under the options the ecosystem offers.

Usage: python benchmarks/cpu_step_speed.py --steps 12
Variants: fp32 with a contiguous or a channels-last layout, channels-last with torch.compile, and bf16
autocast (where the CPU has native bf16). Each trains the same U-Net/ResNet34 from the same seed on the
same random batch of 8 images at 256 px with DiceBCE and Adam; it prints the images per second after
two warm-up steps, the GFLOP/s this implies, and the loss after the last step against the plain
channels-last fp32 variant (same results means a difference at the level of floating-point rounding).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lungseg_utils as L  # noqa: E402

torch = L.torch
GFLOP_PER_IMAGE = 46.6  # forward and backward, ResNet34 U-Net at 256 px (FlopCounterMode, fast_lane.py)


def time_variant(channels_last: bool, compile_model: bool, amp_dtype, steps: int, batch: int = 8) -> tuple[float, float]:
    """Images per second over ``steps`` timed steps, and the loss after the last one."""
    L.seed_everything(L.SEED)
    model = L.build_model("resnet34", None)
    images = torch.rand(batch, 3, 256, 256)
    masks = (torch.rand(batch, 1, 256, 256) > 0.5).float()
    if channels_last:
        model, images = model.to(memory_format=torch.channels_last), images.to(memory_format=torch.channels_last)
    network = torch.compile(model) if compile_model else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = L.DiceBCELoss()
    model.train()
    times = []
    for _ in range(steps + 2):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(network(images).float(), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return batch * steps / sum(times[2:]), float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {L.autocast_dtype(torch.device('cpu'))}")
    variants = {
        "fp32, channels-last (train's default)": (True, False, None),
        "fp32, contiguous": (False, False, None),
        "fp32, channels-last, torch.compile": (True, True, None),
    }
    if L.autocast_dtype(torch.device("cpu")) == torch.bfloat16:
        variants["bf16 autocast, channels-last (train's default here)"] = (True, False, torch.bfloat16)
    reference = None
    for label, options in variants.items():
        started = time.perf_counter()
        rate, loss = time_variant(*options, steps=args.steps)
        reference = loss if reference is None else reference
        difference = f"{loss - reference:+.2e}"
        print(f"{label:52s} {rate:5.2f} img/s  {rate * GFLOP_PER_IMAGE:5.0f} GFLOP/s  loss {loss:.5f} "
              f"(vs the first {difference})  {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
