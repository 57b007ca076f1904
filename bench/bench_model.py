"""Seven-U-Net benchmarks (run on demand, print a table): inference of a 256^3 volume and training speed.

    .venv/bin/python bench/bench_model.py [--slices 16] [--train-iterations 5]

Inference is timed on ``--slices`` axial 256x256 slices and scaled to the 256 slices of a volume;
achieved GFLOP/s (counted by torch's FlopCounterMode) is set against a large matmul measured in the same
run, the machine's practical peak (float32, and bfloat16 where the CPU computes it natively). Then the
shipped package as the pipeline runs it (its signal networks on one 192x160 brain crop) with each backend
it can use here: torch float32, torch bfloat16 autocast, ONNX Runtime float32.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model import onnx_backend
from pipeline.model.inference import _model_for
from pipeline.model.package import SHIPPED_DIR, load_package
from pipeline.model.unet import UNetEnsemble, parameter_counts
from pipeline.protocol import PAPER_PROTOCOL, protocol_features


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def native_bf16() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _seconds_per_call(call: object, repeats: int) -> float:
    call()  # type: ignore[operator]
    start = time.perf_counter()
    for _ in range(repeats):
        call()  # type: ignore[operator]
    return (time.perf_counter() - start) / repeats


def shipped_rows(repeats: int, peak: float, peak_bf16: float) -> list[tuple[str, str]]:
    """The shipped package's signal networks on one 192x160 crop, per backend: ms per slice and GFLOP/s."""
    package = load_package(next(p for p in sorted(SHIPPED_DIR.iterdir()) if p.is_dir()))
    active = tuple(k for k, carries in enumerate(package.signal_channels) if carries)
    model = _model_for(package.model.float().eval(), active)
    x = torch.rand(1, 1, 192, 160)
    p = torch.from_numpy(protocol_features(PAPER_PROTOCOL)[None]) if model.config.protocol_features else None
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, p)
    flops = counter.get_total_flops()
    rows = [(f"shipped {package.name}: networks run / GFLOP per 192x160 slice",
             f"{len(active)} / {flops / 1e9:.2f}")]
    timings = {}
    with torch.inference_mode():
        timings["torch float32"] = _seconds_per_call(lambda: model(x, p), repeats)
        if native_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                timings["torch bf16 autocast"] = _seconds_per_call(lambda: model(x, p), repeats)
    if onnx_backend.available():
        ort = onnx_backend.networks(package, model, active)
        xn, pn = x.numpy(), None if p is None else p.numpy()
        timings["onnxruntime float32"] = _seconds_per_call(lambda: ort(xn, pn), repeats)
    for name, seconds in timings.items():
        floor, kind = (peak_bf16, "bfloat16") if "bf16" in name else (peak, "float32")
        rows.append((f"shipped, {name}: ms per slice / GFLOP/s (share of {kind} matmul)",
                     f"{seconds * 1e3:.0f} / {flops / seconds / 1e9:.1f} ({flops / seconds / 1e9 / floor:.0%})"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--train-iterations", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = UNetEnsemble().eval()
    rows: list[tuple[str, str]] = [("torch threads", str(torch.get_num_threads())),
                                   ("CPU computes bf16 natively (AVX512-BF16 or AMX)", str(native_bf16())),
                                   ("parameters per network / total", "{per_network} / {total}".format(
                                       **parameter_counts(model)))]
    peak = matmul_gflops()
    rows.append(("float32 matmul 2048^2, GFLOP/s", f"{peak:.1f}"))
    peak_bf16 = matmul_gflops(dtype=torch.bfloat16) if native_bf16() else float("nan")
    if native_bf16():
        rows.append(("bfloat16 matmul 2048^2, GFLOP/s", f"{peak_bf16:.1f}"))
    rows += shipped_rows(max(4, args.slices // 2), peak, peak_bf16)
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
        floor, kind = (peak_bf16, "bfloat16") if autocast and native_bf16() else (peak, "float32")
        rows.append((f"inference {name}: achieved GFLOP/s (share of {kind} matmul)",
                     f"{flops_per_slice / per_slice / 1e9:.1f} ({flops_per_slice / per_slice / 1e9 / floor:.0%})"))
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
        rows.append((f"training bf16 autocast, batch {batch} of {crop}^2: iterations/s",
                     f"{1 / min(times[1:] or times):.3f}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
