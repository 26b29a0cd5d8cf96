"""Latency and peak memory of one image through the exported model (onnxruntime) and the torch eager predict,
on the CPU, in the same process, with the same weights (the bundle is exported from the checkpoint that the
torch model loads).

Each engine runs its whole predict pipeline for one image, from the array `read_image` returns to the
probability map at the image's size: torch = engine.predict's prepare (numpy normalisation, resize) +
probability (network, resize back, sigmoid); onnxruntime = release.onnx_predict.OnnxModel.probability (the
same steps inside the graph). Latency: the median (and minimum) of --repeats runs after --warmup runs, the two
engines alternating run by run.
Peak memory: the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above
the resident set before one prediction, with the model loaded; measured on a new onnxruntime session (whose
memory arena grows during its first run and is then kept) and before torch's timed runs.

    python scripts/onnx_benchmark.py                       # paper widths, 224 px, Kvasir from ../shared/data
    python scripts/onnx_benchmark.py --ckpt_path RUN --threads 2 --repeats 20

Without --ckpt_path it builds the paper's 2-level gaze_sup model (widths 64,128,256,512,1024,128, 224 px)
with seeded random weights: latency and memory do not depend on the weights' values.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_rise_mib(fn) -> float:
    """MiB that the peak resident set rises above the current one while fn() runs (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return float("nan")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def timed(fns: dict, warmup: int, repeats: int) -> dict:
    """{name: {median_ms, min_ms}}; the engines alternate run by run, so a load change on a shared CPU hits both."""
    times = {name: [] for name in fns}
    for k in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if k >= warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t)} for name, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kvasir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg"),
                   help="Kvasir-SEG folder (images/)")
    p.add_argument("--image", default=None, help="the full-size image (default: the first of KVASIR/images)")
    p.add_argument("--ckpt_path", default=None, help="a run or checkpoint (default: the paper's model, random weights)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of both engines")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if args.repeats < 10:
        p.error("--repeats must be at least 10 (the median of >= 10 runs)")

    import torch
    from PIL import Image

    import run
    from datasets.io import read_image
    from engine.predict import build_parser as predict_parser
    from engine.predict import load_model, prepare, probability
    from models.checkpoint import save_checkpoint
    from models.segmentation_net import build_model
    from release.onnx_predict import OnnxModel

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    ckpt = args.ckpt_path
    if ckpt is None:
        torch.manual_seed(0)
        model = build_model("gaze_sup", num_levels=2, in_channels=3)  # the paper's widths (the default)
        ckpt = str(work / "paper_widths.pth")
        save_checkpoint(ckpt, {"state_dict": model.state_dict(), "iteration": 0,
                               "args": {"method": "gaze_sup", "num_levels": 2, "in_channels": 3, "data": "kvasir",
                                        "spatial_size": 224, "features": [64, 128, 256, 512, 1024, 128],
                                        "feat_dim": 128}})
        del model
    assert run.cli(["export", "--ckpt_path", ckpt, "--out", str(work / "bundle"), "--quiet"]) == 0
    torch_model, cfg = load_model(ckpt, predict_parser().parse_args(["--ckpt_path", ckpt, "--input", "x", "--out",
                                                                     "y"]), torch.device("cpu"))
    onnx_model = OnnxModel(work / "bundle" / "model.onnx", threads=args.threads)

    full_path = Path(args.image) if args.image else sorted((Path(args.kvasir) / "images").glob("*.jpg"))[0]
    full = read_image(full_path)
    small = np.asarray(Image.fromarray(full).resize((224, 224), Image.BILINEAR))
    report = {"checkpoint": ckpt, "spatial_size": cfg["spatial_size"], "threads": args.threads,
              "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
              "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), "unknown"), "cores": os.cpu_count(), "rows": []}
    print(f"{report['cpu']}, {report['cores']} cores, {args.threads} thread(s); torch {report['torch']}, "
          f"onnxruntime {report['onnxruntime']}; {args.repeats} runs after {args.warmup} warm-up")
    print(f"{'image':<28} {'engine':<12} {'median ms':>10} {'min ms':>9} {'peak +MiB':>10}")
    for name, image in (("224x224 (resized)", small), (f"{full_path.name[:14]} {full.shape[1]}x{full.shape[0]}", full)):
        def torch_run(image=image):
            with torch.no_grad():
                return probability(torch_model, prepare(image, cfg["data"], cfg["spatial_size"], full_path),
                                   image.shape[:2]).numpy()

        def onnx_run(image=image):
            return onnx_model.probability(image)

        # memory first, cold: a new onnxruntime session (its arena grows during its first run and is kept)
        cold = OnnxModel(work / "bundle" / "model.onnx", threads=args.threads)
        memory = {"torch eager": peak_rise_mib(torch_run),
                  "onnxruntime": peak_rise_mib(partial(cold.probability, image))}
        cold = None
        diff = float(np.abs(torch_run() - onnx_run()).max())
        rows = timed({"torch eager": torch_run, "onnxruntime": onnx_run}, args.warmup, args.repeats)
        for engine, r in rows.items():
            r["peak_rise_mib"] = memory[engine]
            print(f"{name:<28} {engine:<12} {r['median_ms']:>10.1f} {r['min_ms']:>9.1f} {r['peak_rise_mib']:>10.1f}")
        ratio = rows["onnxruntime"]["median_ms"] / rows["torch eager"]["median_ms"]
        mem = rows["onnxruntime"]["peak_rise_mib"] / max(rows["torch eager"]["peak_rise_mib"], 1e-9)
        print(f"{'':<28} onnxruntime / torch: latency {ratio:.2f}x, peak memory rise {mem:.2f}x; "
              f"max abs probability difference {diff:.1e}")
        report["rows"].append({"image": name, **{k: v for k, v in rows.items()}, "latency_ratio": ratio,
                               "memory_ratio": mem, "max_abs_diff": diff})
    return report


if __name__ == "__main__":
    main()
