"""Seven-U-Net benchmarks (run on demand, print a table): inference of a 256^3 volume and training speed.

    .venv/bin/python bench/bench_model.py [--slices 16] [--train-iterations 5]

Inference is timed on ``--slices`` axial 256x256 slices and scaled to the 256 slices of a volume;
achieved GFLOP/s (counted by torch's FlopCounterMode) is set against a large float32 matmul measured in
the same run, the machine's practical peak.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model.unet import UNetEnsemble, parameter_counts


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--train-iterations", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = UNetEnsemble().eval()
    rows: list[tuple[str, str]] = [("torch threads", str(torch.get_num_threads())),
                                   ("parameters per network / total", "{per_network} / {total}".format(
                                       **parameter_counts(model)))]
    peak = matmul_gflops()
    rows.append(("float32 matmul 2048^2, GFLOP/s", f"{peak:.1f}"))
    x = torch.rand(args.batch, 1, 256, 256)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    flops_per_slice = counter.get_total_flops()
    rows.append(("inference GFLOP per slice (7 nets)", f"{flops_per_slice / 1e9:.1f}"))
    for name, autocast in (("float32", False), ("bf16 autocast", True)):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x)
            start = time.perf_counter()
            for _ in range(max(1, args.slices // args.batch)):
                model(x)
            per_slice = (time.perf_counter() - start) / (max(1, args.slices // args.batch) * args.batch)
        rows.append((f"inference {name}: s per slice / s per 256^3 volume",
                     f"{per_slice:.2f} / {256 * per_slice:.0f}"))
        rows.append((f"inference {name}: achieved GFLOP/s (share of matmul)",
                     f"{flops_per_slice / per_slice / 1e9:.1f} ({flops_per_slice / per_slice / 1e9 / peak:.0%})"))
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    for crop, batch in ((128, 8), (128, 16), (256, 16)):
        xb, yb = torch.rand(batch, 1, crop, crop), torch.rand(batch, 7, crop, crop)
        times = []
        for _ in range(args.train_iterations):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(xb)
            loss = ((out.float() - yb) ** 2).mean(dim=(0, 2, 3)).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            times.append(time.perf_counter() - start)
        rows.append((f"training bf16, batch {batch} of {crop}^2: iterations/s", f"{1 / min(times[1:] or times):.3f}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
