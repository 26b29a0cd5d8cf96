"""Training-step speed and memory of GazeSup against the paper's unfold/einsum feature propagation,
measured on the same device in one run, plus test-set evaluation time.

A step is forward + gaze_sup_loss + backward + SGD step. Every implementation is selected through
build_model's `propagation` argument, with the same weights: "ours" is propagation="torch" (the
default), "triton" (CUDA only) is propagation="triton" (the fused kernels of
models/feature_propagation_triton.py), "reference" passes the paper's unfold/einsum formulation (written
below) and "none" the identity, so a step minus the "none" step is what the propagation costs inside
the step. Each variant (amp / channels_last / compile / optimizer implementation) measures all of them,
so their ratios come from one run on one card. The propagation alone (forward + backward) is timed too.

Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the allocator's peak, replayed from
torch.profiler's allocation events (no allocator rounding or library workspaces, as on a GPU).
The conv/matmul work per step is counted once on the meta device (FlopCounterMode), giving the
arithmetic floor at --tflops. `--profile FILE` appends torch.profiler's top kernels of each step.

    python scripts/benchmark.py                                 # paper setting, cuda
    python scripts/benchmark.py --variants all --json bench.json
    python scripts/benchmark.py --device cpu --spatial-size 64 --batch-size 2 \\
        --features 16,16,32,32,64,16 --feat-dim 16 --warmup 1 --iters 3 --eval-images 4

Variant spec: '+'-joined tokens: fp32 | bf16 (autocast), cl (channels_last), foreach | fused
(optimizer implementation), compile (torch.compile the model). `--variants all` runs ALL_VARIANTS.
"""
import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from losses import gaze_sup_loss
from models.feature_propagation import Propagation, propagation_function
from models.memory import CpuPeakBytes, saved_tensor_bytes, storage_bytes
from models.segmentation_net import build_model

ALL_VARIANTS = "fp32,fp32+cl+fused,bf16,bf16+cl,bf16+cl+fused,bf16+cl+fused+compile"
TOKENS = {"fp32", "bf16", "cl", "foreach", "fused", "compile"}


def unfold_propagation(feature: torch.Tensor) -> torch.Tensor:
    """The paper's feature propagation: unfold the 25 dilated neighbours, then two einsums."""
    B, C, H, W = feature.shape
    neigh = F.unfold(feature, kernel_size=5, dilation=2, padding=4).view(B, C, 25, H, W)
    corr = torch.einsum("bchw,bcnhw->bnhw", feature, neigh)
    attn = torch.softmax(corr.clamp(min=0), dim=1)
    return torch.einsum("bnhw,bcnhw->bchw", attn, neigh)


def no_propagation(feature: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline: the step without the propagation's work."""
    return feature


# what each --impls name passes to build_model(propagation=...): a name of the model's own, or a callable
IMPLS: dict[str, str | Propagation] = {"ours": "torch", "triton": "triton", "reference": unfold_propagation,
                                       "none": no_propagation}


def gaze_model(args, impl: str) -> torch.nn.Module:
    """The benchmarked gaze_sup model with impl's propagation (on the current default device)."""
    return build_model("gaze_sup", args.num_levels, 3, args.features, args.feat_dim, propagation=IMPLS[impl])


def parse_variant(spec: str) -> set[str]:
    tokens = set(spec.split("+"))
    if tokens - TOKENS or {"fp32", "bf16"} <= tokens or {"foreach", "fused"} <= tokens:
        raise ValueError(f"bad variant {spec!r}: use '+'-joined tokens from {sorted(TOKENS)} "
                         f"(one of fp32/bf16, at most one of foreach/fused)")
    return tokens


def flag_variant(args) -> str:
    """The variant that --amp / --channels-last / --optimizer / --compile describe."""
    return "+".join([args.amp if args.amp == "bf16" else "fp32"] + (["cl"] if args.channels_last else [])
                    + ([args.optimizer] if args.optimizer != "default" else [])
                    + (["compile"] if args.compile else []))


def variant_names(args) -> list[str]:
    if args.variants:
        names = (ALL_VARIANTS if args.variants == "all" else args.variants).split(",")
    else:
        names = [flag_variant(args)]
    for name in names:
        parse_variant(name)
    return names


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, iters: int, device: torch.device) -> float:
    """ms per call of fn: CUDA events around the whole loop on GPU; on CPU the median of
    per-call wall times (robust to other jobs sharing the cores)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def step_tflop(args) -> dict:
    """Convolution/matmul TFLOP of one training step (forward + backward), counted on the meta device.
    The propagation is left out: it is elementwise (~2.6 GFLOP at the paper setting)."""
    with torch.device("meta"):
        model = gaze_model(args, "none")
        x = torch.randn(args.batch_size, 3, args.spatial_size, args.spatial_size)
        masks = [torch.rand(args.batch_size, 1, args.spatial_size, args.spatial_size)] * args.num_levels
        counter = FlopCounterMode(display=False)
        with counter:
            loss, _ = gaze_sup_loss(model(x), masks, args.cons_weight, args.cons_mode)
            loss.backward()
    return {"tflop_per_step": counter.get_total_flops() / 1e12}


def profile_table(step, device: torch.device, iters: int) -> str:
    """torch.profiler's top ops/kernels over iters steps, by self time on the device (CPU on CPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25)


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def make_model(args, tokens: set[str], device: torch.device, impl: str = "ours"):
    torch.manual_seed(args.seed)  # the same weights for every variant and implementation
    model = gaze_model(args, impl).to(device)
    if "cl" in tokens:
        model = model.to(memory_format=torch.channels_last)
    kwargs = {"foreach": True} if "foreach" in tokens else {"fused": True} if "fused" in tokens else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True,
                                weight_decay=args.weight_decay, **kwargs)
    return model, optimizer


def make_batch(args, tokens: set[str], device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    shape = (args.batch_size, 3, args.spatial_size, args.spatial_size)
    x = torch.randn(shape, generator=gen).to(device)
    if "cl" in tokens:
        x = x.to(memory_format=torch.channels_last)
    masks = [(torch.rand(args.batch_size, 1, args.spatial_size, args.spatial_size, generator=gen) > 0.5)
             .float().to(device) for _ in range(args.num_levels)]
    return x, masks


def bench_train(args, variant: str, impl: str, device: torch.device) -> dict:
    """ms per training step, peak memory and saved-activation bytes of one (variant, impl)."""
    tokens = parse_variant(variant)
    amp = "bf16" in tokens
    model, optimizer = make_model(args, tokens, device, impl)
    x, masks = make_batch(args, tokens, device)
    with autocast(device, amp):
        saved = saved_tensor_bytes(model, x)
    step_model = torch.compile(model) if "compile" in tokens else model

    def step():
        with autocast(device, amp):
            outputs = step_model(x)
        loss, _ = gaze_sup_loss(outputs, masks, args.cons_weight, args.cons_mode)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    # on CPU the allocator is watched over the first two steps (the second has optimizer state)
    track = device.type == "cpu" and "compile" not in tokens
    tracker = (CpuPeakBytes(storage_bytes(*model.parameters(), *model.buffers(), x, *masks)) if track
               else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tracker:
        t0 = time.perf_counter()
        first_loss = step().item()  # equal across impls (same weights and batch): a sanity check
        first_step_s = time.perf_counter() - t0
        if track:
            step()
    for _ in range(args.warmup - track):
        step()
    ms = time_ms(step, args.iters, device)
    result = {"variant": variant, "impl": impl, "ms_per_step": ms,
              "saved_mb": saved / 2**20, "first_step_s": first_step_s, "first_loss": first_loss}
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    elif track:
        result["peak_mb"] = tracker.peak / 2**20
    if args.profile:
        with open(args.profile, "a") as f:
            f.write(f"\n== {variant} / {impl}: {args.profile_iters} steps ==\n")
            f.write(profile_table(step, device, args.profile_iters) + "\n")
    return result


def bench_propagation(args, variant: str, impl: str, device: torch.device) -> dict:
    """ms for forward + backward of the propagation alone on a (batch, feat_dim, size, size) map
    (bf16 input for bf16 variants, channels_last for cl), its saved bytes and peak memory."""
    tokens = parse_variant(variant)
    dtype = torch.bfloat16 if "bf16" in tokens else torch.float32
    shape = (args.batch_size, args.feat_dim, args.spatial_size, args.spatial_size)
    gen = torch.Generator().manual_seed(args.seed)
    feature = torch.randn(shape, generator=gen).to(device, dtype)
    if "cl" in tokens:
        feature = feature.to(memory_format=torch.channels_last)
    feature.requires_grad_()
    grad_out = torch.randn(shape, generator=gen).to(device, dtype)
    fn = propagation_function(IMPLS[impl])
    saved = saved_tensor_bytes(fn, feature)

    def step():
        fn(feature).backward(grad_out)
        feature.grad = None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    # CPU: what one forward + backward allocates on top of F and dL/dout
    tracker = CpuPeakBytes() if device.type == "cpu" else contextlib.nullcontext()
    with tracker:
        step()
    for _ in range(args.warmup - 1):
        step()
    result = {"variant": variant, "impl": impl, "ms_fwd_bwd": time_ms(step, args.iters, device),
              "saved_mb": saved / 2**20}
    if device.type == "cuda":
        result["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        result["peak_mb"] = tracker.peak / 2**20
    return result


@torch.inference_mode()
def bench_eval(args, variant: str, device: torch.device) -> dict:
    """Seconds to segment eval_images random images one at a time: upload, forward(x, propagate=False),
    bilinear upsampling to the mask size, threshold, download (as a test loop would)."""
    tokens = parse_variant(variant)
    model, _ = make_model(args, tokens, device)
    model.eval()
    if "compile" in tokens:
        model = torch.compile(model)
    gen = torch.Generator().manual_seed(args.seed)
    images = [torch.randn(1, 3, args.eval_size, args.eval_size, generator=gen) for _ in range(args.eval_images)]
    memory_format = torch.channels_last if "cl" in tokens else torch.contiguous_format

    def segment(image: torch.Tensor) -> torch.Tensor:
        x = image.to(device, non_blocking=True).to(memory_format=memory_format)
        with autocast(device, "bf16" in tokens):
            logits = model(x, propagate=False)["logits"]
        logits = F.interpolate(logits.float(), size=args.mask_size, mode="bilinear", align_corners=False)
        return (logits > 0).cpu()

    for image in images[:2]:  # warmup (and compilation)
        segment(image)
    sync(device)
    t0 = time.perf_counter()
    for image in images:
        segment(image)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"variant": variant, "images": args.eval_images, "seconds": seconds,
            "ms_per_image": 1e3 * seconds / max(args.eval_images, 1)}


def end_to_end(args) -> dict:
    """Iterations/s of the real training loop's data path and step (engine.train.Trainer: batches from
    the preloaded, resized training set with the flips on the device, then Trainer.train_step) on --root,
    or on a synthetic Kvasir-layout dataset, to compare with the bare step time above."""
    import logging
    import tempfile

    from engine.distributed import DistContext
    from engine.train import Trainer
    from parse_args import parse_args as run_args
    from prepare.synthetic import make_synthetic_dataset

    tmp = Path(tempfile.mkdtemp(prefix="gazesup_e2e_"))
    root = args.root
    if root is None:
        root = tmp / "data"
        make_synthetic_dataset(root, num_train=max(4 * args.batch_size, 16), num_test=2, size_range=(300, 400))
        gaze = root / "gaze" / "crf_compat1"
        gaze.mkdir(parents=True)
        for mask in (root / "masks").glob("*.jpg"):  # stand-in gaze maps: the data path is what is timed
            (gaze / mask.name).write_bytes(mask.read_bytes())
    flags = ["--root", str(root), "--spatial_size", str(args.spatial_size), "-bs", str(args.batch_size),
             "--features", ",".join(map(str, args.features)), "--feat_dim", str(args.feat_dim), "--opt", "sgd",
             "--lr", str(args.lr), "--cons_weight", str(args.cons_weight), "--cons_mode", args.cons_mode,
             "--amp", args.amp, "--num_worker", "0", "--quiet", "--max_ite", str(args.warmup + args.iters)]
    targs = run_args(flags + (["--channels_last"] if args.channels_last else [])
                     + (["--compile"] if args.compile else []))
    device = torch.device(args.device)
    t0 = time.perf_counter()
    trainer = Trainer(targs, tmp, device, DistContext(), logging.getLogger("benchmark"))
    setup = time.perf_counter() - t0

    def steps():
        epoch = 1
        while True:
            for _, images, targets in trainer.batches.epoch(epoch, (epoch - 1) * len(trainer.batches) + 1):
                yield images, targets
            epoch += 1

    batches = steps()
    for _ in range(args.warmup):
        trainer.train_step(*next(batches))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        trainer.train_step(*next(batches))
    sync(device)
    ms = 1e3 * (time.perf_counter() - t0) / args.iters
    return {"variant": flag_variant(args), "ms_per_iteration": ms, "iterations_per_s": 1e3 / ms, "setup_s": setup,
            "train_images": len(trainer.batches.dataset), "root": str(root)}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def _ratio(num: float | None, den: float) -> str:
    return f"{num / den:.2f}" if num else "-"


def _timing_rows(title: str, records: list, key: str, with_fp32: bool) -> list:
    """Table rows: ms, peak and saved memory per (variant, impl), and the speed-up over the reference
    of the same variant (and over the fp32 reference)."""
    ref = {r["variant"]: r[key] for r in records if r["impl"] == "reference" and "error" not in r}
    lines = [f"{title:<26}{'impl':<11}{'ms':>9}{'peak MB':>10}{'saved MB':>10}{'x ref':>9}"
             + (f"{'x ref fp32':>11}" if with_fp32 else "")]
    for r in records:
        if "error" in r:
            lines.append(f"{r['variant']:<26}{r['impl']:<11}  ERROR: {r['error']}")
            continue
        ms, peak = r[key], f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
        lines.append(f"{r['variant']:<26}{r['impl']:<11}{ms:>9.1f}{peak:>10}{r['saved_mb']:>10.1f}"
                     f"{_ratio(ref.get(r['variant']), ms):>9}"
                     + (f"{_ratio(ref.get('fp32'), ms):>11}" if with_fp32 else ""))
    return lines


def propagation_costs(train: list[dict]) -> list[str]:
    """Per variant: each implementation's step minus the step without propagation ("none")."""
    ok = [r for r in train if "error" not in r]
    lines = []
    for variant in dict.fromkeys(r["variant"] for r in ok):
        ms = {r["impl"]: r["ms_per_step"] for r in ok if r["variant"] == variant}
        if "none" in ms and len(ms) > 1:
            costs = ", ".join(f"{impl} {t - ms['none']:.1f}" for impl, t in ms.items() if impl != "none")
            lines.append(f"propagation inside the {variant} step (ms, step - none at {ms['none']:.1f}): {costs}")
    return lines


def table(report: dict) -> str:
    """The summary: training steps, propagation alone, evaluation, end to end."""
    lines = [f"device: {report['device']}  torch {report['torch']}"]
    tflop = report.get("tflop_per_step")
    if isinstance(tflop, float):
        lines.append(f"conv/matmul work: {tflop:.3g} TFLOP per step -> floor "
                     f"{1e3 * tflop / report['args']['tflops']:.1f} ms at {report['args']['tflops']:g} TFLOP/s")
    lines += _timing_rows("training step", report["train"], "ms_per_step", with_fp32=True)
    lines += propagation_costs(report["train"])
    lines += _timing_rows("propagation fwd+bwd", report["propagation"], "ms_fwd_bwd", with_fp32=False)
    for e in report["eval"]:
        if "error" in e:
            lines.append(f"eval {e['variant']}: ERROR: {e['error']}")
        else:
            lines.append(f"eval {e['variant']}: {e['images']} images in {e['seconds']:.2f} s "
                         f"({e['ms_per_image']:.1f} ms/image)")
    if "end_to_end" in report:
        e = report["end_to_end"]
        step = next((r["ms_per_step"] for r in report["train"]
                     if r["variant"] == e["variant"] and r["impl"] == "ours" and "error" not in r), None)
        lines.append(f"end to end ({e['variant']}, {e['train_images']} training images): {e['ms_per_iteration']:.1f} "
                     f"ms/iteration"
                     + (f", {100 * step / e['ms_per_iteration']:.0f}% of the bare step rate" if step else ""))
    for impl, best in report["summary"].items():
        line = f"best {impl}: {best['variant']} {best['ms_per_step']:.1f} ms/step"
        if "speedup_vs_reference_fp32" in best:
            line += f", {best['speedup_vs_reference_fp32']:.2f}x the reference fp32"
        if "peak_mb" in best:
            line += f", peak {best['peak_mb'] / 1024:.2f} GiB"
        lines.append(line)
    return "\n".join(lines)


def summary(train: list[dict]) -> dict:
    """Per implementation: its fastest variant and the speedup over the fp32 reference step."""
    ok = [r for r in train if "error" not in r]
    base = next((r["ms_per_step"] for r in ok if r["impl"] == "reference" and r["variant"] == "fp32"), None)
    out = {}
    for impl in dict.fromkeys(r["impl"] for r in ok):
        best = min((r for r in ok if r["impl"] == impl), key=lambda r: r["ms_per_step"])
        out[impl] = {k: best[k] for k in ("variant", "ms_per_step", "peak_mb") if k in best}
        if base:
            out[impl]["speedup_vs_reference_fp32"] = base / best["ms_per_step"]
    return out


def attempt(label: str, fn, *fn_args) -> dict:
    """Run one measurement; on failure print the traceback and return the error instead."""
    print(f"[{label}] ...", flush=True)
    try:
        return fn(*fn_args)
    except Exception as e:  # noqa: BLE001 -- keep going: one failing variant must not lose the table
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def save(report: dict, path: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--num-levels", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--spatial-size", type=int, default=224)
    p.add_argument("--features", default="64,128,256,512,1024,128", help="six BasicUNet widths")
    p.add_argument("--feat-dim", type=int, default=128)
    p.add_argument("--cons-weight", type=float, default=3.0)
    p.add_argument("--cons-mode", default="prop", choices=["prop", "pure"])
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--momentum", type=float, default=0.99)
    p.add_argument("--weight-decay", type=float, default=4e-4)
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--optimizer", default="default", choices=["default", "foreach", "fused"])
    p.add_argument("--variants", default="", help=f"comma list of variant specs, or 'all' = {ALL_VARIANTS}; "
                                                  "overrides --amp/--channels-last/--compile/--optimizer")
    p.add_argument("--impls", default="", help="comma list from ours, triton, reference, none "
                                               "(default: ours,triton,reference on cuda, ours,reference on cpu)")
    p.add_argument("--reference-compile", action="store_true", help="also run the reference in compile variants")
    p.add_argument("--cudnn-benchmark", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--eval-images", type=int, default=120, help="0 skips the evaluation timing")
    p.add_argument("--eval-size", type=int, default=224)
    p.add_argument("--mask-size", default="529,622", help="H,W the logits are upsampled to")
    p.add_argument("--no-propagation", dest="propagation", action="store_false",
                   help="skip timing the propagation alone")
    p.add_argument("--end-to-end", action="store_true",
                   help="also time the training loop's real data path (Trainer batches + step)")
    p.add_argument("--root", default=None, help="prepared dataset for --end-to-end (default: synthetic)")
    p.add_argument("--profile", default="", help="append torch.profiler's top ops of each training step here")
    p.add_argument("--profile-iters", type=int, default=3)
    p.add_argument("--tflops", type=float, default=790.0,
                   help="matrix rate for the arithmetic floor (default: bf16 measured on an H200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    args.features = tuple(int(f) for f in args.features.split(","))
    args.mask_size = tuple(int(s) for s in args.mask_size.split(","))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark: --device cuda but CUDA is not available (use --device cpu)")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)")
    default_impls = "ours,triton,reference" if device.type == "cuda" else "ours,reference"
    impls = [i for i in (args.impls or default_impls).split(",") if i]
    if set(impls) - set(IMPLS):
        raise SystemExit(f"benchmark: --impls {args.impls!r}: expected a comma list from {sorted(IMPLS)}")
    variants = variant_names(args)

    report = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
              "args": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
              "train": [], "propagation": [], "eval": []}
    work = attempt("conv/matmul FLOPs", step_tflop, args)
    report["tflop_per_step"] = work.get("tflop_per_step", work.get("error"))
    if args.profile:
        Path(args.profile).parent.mkdir(parents=True, exist_ok=True)
        Path(args.profile).write_text(f"device: {device_name}  torch {torch.__version__}\n")

    def measure(section: str, fn, variant: str, *impl: str) -> None:
        """One measurement into report[section]; the JSON is rewritten after each, so a run cut
        short by a time limit keeps what it measured."""
        r = attempt(f"{section} {' / '.join((variant, *impl))}", fn, args, variant, *impl, device)
        report[section].append({"variant": variant, **({"impl": impl[0]} if impl else {}), **r})
        print(f"  -> {({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})}", flush=True)
        free(device)
        save(report, args.json)

    for variant in variants:
        for impl in impls:
            if impl == "reference" and "compile" in variant and not args.reference_compile:
                continue
            measure("train", bench_train, variant, impl)
            if "compile" not in variant and args.propagation:
                measure("propagation", bench_propagation, variant, impl)
        if args.eval_images > 0:
            measure("eval", bench_eval, variant)
    if args.end_to_end:
        report["end_to_end"] = end_to_end(args)
    report["summary"] = summary(report["train"])
    save(report, args.json)
    print(table(report))
    return report


if __name__ == "__main__":
    main()
