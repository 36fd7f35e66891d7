"""Cost of dnn2bnn against the deterministic model (issue 8), all measurements in one run.

    python benchmarks/bench_speed.py            # full run (10 rounds)
    python benchmarks/bench_speed.py --quick    # 3 rounds, fewer repetitions

Measures, on CPU with one thread (interleaved rounds, median of per-round ratios):
1. one training step (forward, cross-entropy + KL/N, backward, Adam), default estimator, on
   MLP 784-1200-1200-10 (batch 128), LeNet-5 (batch 64), ResNet-18 3x32x32 (batch 32);
2. Monte Carlo prediction with 16 samples against 16 deterministic passes (a plain loop of
   forward passes; ``dnn2bnn.predict`` too when the installed dnn2bnn has it);
3. ResNet-18 with only ``fc`` Bayesian: 16-sample prediction against ONE deterministic pass
   (needs ``dnn2bnn.predict``, which runs the deterministic trunk once; the plain loop is
   shown for reference);
4. conversion time of a ResNet-50 (median of 3);
5. peak training memory (growth of the peak RSS of a fresh subprocess, Linux; on CUDA the
   peak allocated GPU memory) relative to deterministic;
6. the same train step with ``torch.optim.Adam(fused=True)`` on both sides, and two
   *floors*, ratios that any implementation drawing one fresh Gaussian per weight pays
   before doing anything else: noise, ``1 + t(randn over every Bayesian weight) / t(det.
   step)`` (``1 + 16 t(randn) / t(16 det. passes)`` for MC), and noise + the optimizer over
   the extra parameters, adding ``t(Adam step over the rho parameters) / t(det. step)``;
   a third adds one pass each of ``softplus(rho)``, ``sigmoid(rho)`` and ``log(sigma)``,
   which ``sigma = softplus(rho)`` and the closed-form KL need in any implementation.
``--device cuda`` runs everything on the GPU (timings synchronised).
With bayesian-torch installed (``pip install .[bench]``), its ``dnn_to_bnn`` is timed
side by side. Prints a table; writes benchmarks/results/bench_speed.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import dnn2bnn  # noqa: E402
from _common import (  # noqa: E402
    WORKLOADS, Workload, batch, interleaved, median_ratio, table, train_step, write_json,
)

SAMPLES = 16
KL_SCALE = 1.0 / 60_000
TARGETS = {  # issue 8
    "train": {"MLP 784-1200-1200-10": 1.6, "LeNet-5": 1.15, "ResNet-18 3x32x32": 1.25},
    "mc": 1.2,
    "last_layer": 1.3,
    "resnet50_conversion_s": 1.0,
    "memory": 2.5,
}

try:  # optional comparison, never required
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn, get_kl_loss
except ImportError:  # pragma: no cover - depends on the environment
    dnn_to_bnn = get_kl_loss = None


def bayesian_torch_model(workload: Workload) -> torch.nn.Module | None:
    if dnn_to_bnn is None:
        return None
    model = workload.make()
    dnn_to_bnn(model, {
        "prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
        "type": "Reparameterization", "moped_enable": False, "moped_delta": 0.5,
    })
    return model


def bt_train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y) + KL_SCALE * get_kl_loss(model)
        loss.backward()
        optimizer.step()

    return step


def mc_loop(model: torch.nn.Module, x: torch.Tensor, samples: int = SAMPLES) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.no_grad():
            torch.stack([model(x).softmax(-1) for _ in range(samples)]).mean(0)

    return run


def mc_predict(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None] | None:
    predict = getattr(dnn2bnn, "predict", None)
    if predict is None:
        return None
    model.eval()
    return lambda: predict(model, x, num_samples=SAMPLES)


def one_pass(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def fmt(ratio: float | None, target: float | None = None) -> str:
    if ratio is None:
        return "n/a"
    mark = "" if target is None else (" ok" if ratio <= target else " MISS")
    return f"{ratio:.2f}x{mark}"


def measure_memory(index: int, variant: str) -> float:
    """Max-RSS growth (MiB) of a fresh process doing 3 train steps of one variant."""
    # glibc keeps freed large blocks in the heap (dynamic mmap threshold), so the RSS would
    # show the allocator's high-water mark rather than live tensors; a fixed threshold makes
    # every large tensor its own mapping, returned on free. Same setting for every variant.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, __file__, "--_memory", str(index), variant],
        capture_output=True, text=True, check=True, env=env,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cuda_memory(workload: Workload, variant: str, device: str) -> float:
    """Peak allocated GPU memory (MiB) over 3 train steps of one variant, from a clean slate."""
    x, y = batch(workload, device=device)
    model = workload.make().to(device)
    if variant == "dnn2bnn":
        model = dnn2bnn.transform_to_bnn_model(model, inplace=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step = train_step(model, x, y, None if variant == "deterministic" else KL_SCALE)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model, step
    return peak / 2**20


def noise(model: torch.nn.Module, draws: int = 1) -> Callable[[], None]:
    """``torch.randn`` over as many numbers as ``model`` has Bayesian weights, ``draws`` times."""
    count = sum(
        p.numel() for name, p in model.named_parameters() if name.endswith("_mu")
    )
    device = next(model.parameters()).device

    def run() -> None:
        for _ in range(draws):
            torch.randn(count, device=device)

    return run


def transcendentals(model: torch.nn.Module) -> Callable[[], None]:
    """``softplus(rho)``, ``sigmoid(rho)`` and ``log(sigma)`` over every Bayesian weight: one
    pass each that ``sigma = softplus(rho)`` (forward), its derivative (backward) and the
    closed-form KL's ``sum(log sigma)`` need whatever the implementation."""
    rhos = [p.detach() for name, p in model.named_parameters() if name.endswith("_rho")]

    def run() -> None:
        for rho in rhos:
            torch.log(torch.nn.functional.softplus(rho)).sum()
            torch.sigmoid(rho)

    return run


def rho_adam(model: torch.nn.Module, fused: bool = False) -> Callable[[], None]:
    """One Adam step over the ``rho`` parameters alone: the optimizer work a Bayesian model
    adds (its means replace the deterministic weights one for one)."""
    rhos = [p for name, p in model.named_parameters() if name.endswith("_rho")]
    clones = [torch.nn.Parameter(p.detach().clone()) for p in rhos]
    for p in clones:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.Adam(clones, lr=1e-4, **({"fused": True} if fused else {}))
    return optimizer.step


def _memory_child(index: int, variant: str) -> None:
    torch.set_num_threads(1)
    workload = WORKLOADS[index]
    x, y = batch(workload)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _status_kib("VmRSS")
    model = workload.make()
    if variant == "dnn2bnn":
        model = dnn2bnn.transform_to_bnn_model(model, inplace=True)
    elif variant == "bayesian-torch":
        model = bayesian_torch_model(workload)
    step = bt_train_step(model, x, y) if variant == "bayesian-torch" else train_step(
        model, x, y, None if variant == "deterministic" else KL_SCALE)
    for _ in range(3):
        step()
    print((_status_kib("VmHWM") - base) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 repetition")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        _memory_child(int(args._memory[0]), args._memory[1])
        return
    rounds = args.rounds or (3 if args.quick else 10)
    reps = 1 if args.quick else 3
    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = args.device
    cuda = device.startswith("cuda")
    bt_model = bayesian_torch_model if not cuda else (lambda workload: None)
    tools = ["dnn2bnn"] + (["bayesian-torch"] if dnn_to_bnn is not None and not cuda else [])
    results: dict = {"rounds": rounds, "reps": reps, "samples": SAMPLES, "targets": TARGETS,
                     "device": torch.cuda.get_device_name() if cuda else "cpu"}
    rows = []
    for index, workload in enumerate(WORKLOADS):
        x, y = batch(workload, device=device)
        dnn = workload.make().to(device)
        bnn = dnn2bnn.transform_to_bnn_model(dnn)
        bt = bt_model(workload)
        dnn_f = workload.make().to(device)
        bnn_f = dnn2bnn.transform_to_bnn_model(dnn_f)
        train = {
            "deterministic": train_step(dnn, x, y, None),
            "dnn2bnn": train_step(bnn, x, y, KL_SCALE),
            "deterministic (fused Adam)": train_step(dnn_f, x, y, None, fused=True),
            "dnn2bnn (fused Adam)": train_step(bnn_f, x, y, KL_SCALE, fused=True),
            "noise": noise(bnn),
            "rho Adam": rho_adam(bnn),
            "softplus, sigmoid, log": transcendentals(bnn),
            "rho Adam (fused)": rho_adam(bnn, fused=True),
        }
        mc = {"deterministic": mc_loop(dnn, x), "dnn2bnn": mc_loop(bnn, x),
              "noise": noise(bnn, SAMPLES)}
        if bt is not None:
            train["bayesian-torch"] = bt_train_step(bt, x, y)
            mc["bayesian-torch"] = mc_loop(bt, x)
        predict = mc_predict(bnn, x)
        if predict is not None:
            mc["dnn2bnn.predict"] = predict
        train_times = interleaved(train, rounds=rounds, reps=reps)
        mc_times = interleaved(mc, rounds=rounds, reps=reps)
        fused_ratio = median_ratio(train_times, "dnn2bnn (fused Adam)", "deterministic (fused Adam)")
        entry = {
            "train": {k: median_ratio(train_times, k, "deterministic") for k in tools},
            "train_fused_adam": fused_ratio,
            "train_noise_floor": 1 + median_ratio(train_times, "noise", "deterministic"),
            "train_noise_floor_fused_adam": 1 + median_ratio(train_times, "noise", "deterministic (fused Adam)"),
            # noise + the optimizer over the extra (rho) parameters: paid by any implementation
            "train_floor": 1 + median_ratio(train_times, "noise", "deterministic")
            + median_ratio(train_times, "rho Adam", "deterministic"),
            "train_floor_fused_adam": 1 + median_ratio(train_times, "noise", "deterministic (fused Adam)")
            + median_ratio(train_times, "rho Adam (fused)", "deterministic (fused Adam)"),
            # + the three transcendental passes of the softplus parametrization and the KL
            "train_floor_parametrization": 1 + median_ratio(train_times, "noise", "deterministic")
            + median_ratio(train_times, "rho Adam", "deterministic")
            + median_ratio(train_times, "softplus, sigmoid, log", "deterministic"),
            "mc": {k: median_ratio(mc_times, k, "deterministic") for k in mc
                   if k not in ("deterministic", "noise")},
            "mc_noise_floor": 1 + median_ratio(mc_times, "noise", "deterministic"),
            "train_deterministic_ms": 1e3 * statistics.median(train_times["deterministic"]),
            "train_deterministic_fused_adam_ms": 1e3 * statistics.median(train_times["deterministic (fused Adam)"]),
            "mc_deterministic_ms": 1e3 * statistics.median(mc_times["deterministic"]),
        }
        if cuda:
            entry["memory_mib"] = {v: cuda_memory(workload, v, device) for v in ["deterministic", *tools]}
        else:
            entry["memory_mib"] = {v: measure_memory(index, v) for v in ["deterministic", *tools]}
        entry["memory"] = {
            v: entry["memory_mib"][v] / entry["memory_mib"]["deterministic"] for v in tools
        }
        results[workload.name] = entry
        target = TARGETS["train"][workload.name]
        rows.append([
            workload.name,
            f"{entry['train_deterministic_ms']:.1f} ms",
            fmt(entry["train"]["dnn2bnn"], target) + f" (<= {target})",
            f"{entry['train_noise_floor']:.2f}x / {entry['train_floor']:.2f}x / "
            f"{entry['train_floor_parametrization']:.2f}x",
            fmt(entry["train_fused_adam"], target) + f" ({entry['train_floor_fused_adam']:.2f}x)",
            fmt(entry["mc"]["dnn2bnn"], TARGETS["mc"]),
            fmt(entry["mc"].get("dnn2bnn.predict"), TARGETS["mc"]),
            f"{entry['mc_noise_floor']:.2f}x",
            fmt(entry["memory"]["dnn2bnn"], TARGETS["memory"]),
            *([fmt(entry["train"]["bayesian-torch"]), fmt(entry["mc"]["bayesian-torch"]),
               fmt(entry["memory"]["bayesian-torch"])] if bt is not None else []),
        ])
        print(f"done: {workload.name}", file=sys.stderr, flush=True)

    # 3. ResNet-18 with a Bayesian last layer: 16 samples vs ONE deterministic pass
    workload = WORKLOADS[2]
    x, _ = batch(workload, device=device)
    dnn = workload.make().to(device)
    last = dnn2bnn.transform_to_bnn_model(dnn, include="fc")
    variants = {"deterministic x1": one_pass(dnn, x), "loop x16": mc_loop(last, x)}
    predict = mc_predict(last, x)
    if predict is not None:
        variants["dnn2bnn.predict"] = predict
    times = interleaved(variants, rounds=rounds, reps=1, warmup=1)
    last_layer = {k: median_ratio(times, k, "deterministic x1") for k in variants if k != "deterministic x1"}
    results["last_layer"] = last_layer

    # 4. conversion time of ResNet-50
    resnet50 = torchvision.models.resnet50()
    conversions = []
    for _ in range(3):
        start = time.perf_counter()
        dnn2bnn.transform_to_bnn_model(resnet50)
        conversions.append(time.perf_counter() - start)
    results["resnet50_conversion_s"] = statistics.median(conversions)

    header = ["workload", "det. step", "train step", "floor: noise / +rho Adam / +softplus,sigmoid,log",
              "train, fused Adam (floor)",
              "MC x16 (loop)", "MC x16 (predict)", "MC noise floor", "peak memory"]
    if len(tools) > 1:
        header += ["bayesian-torch train", "bayesian-torch MC", "bayesian-torch memory"]
    print(table(header, rows))
    print()
    print(table(["ResNet-18, Bayesian fc only: 16 samples vs ONE deterministic pass", "ratio"], [
        ["plain loop of 16 passes (reference)", fmt(last_layer["loop x16"])],
        ["dnn2bnn.predict", fmt(last_layer.get("dnn2bnn.predict"), TARGETS["last_layer"])],
    ]))
    print(f"\nResNet-50 conversion: {results['resnet50_conversion_s']:.3f} s (target < 1 s)")
    path = write_json("bench_speed" + ("_cuda" if cuda else ""), results)
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
