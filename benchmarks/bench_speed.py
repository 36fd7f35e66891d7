"""Cost of dnn2bnn against the deterministic model and its peers (issues 8, 17), one run.

    python benchmarks/bench_speed.py                  # full run (10 rounds x 3 repetitions)
    python benchmarks/bench_speed.py --quick          # 3 rounds x 1 repetition
    python benchmarks/bench_speed.py --quick --workloads mlp --skip-memory   # one workload, fast
    python benchmarks/bench_speed.py --profile        # + profiler tables and aten ops per step
    python benchmarks/bench_speed.py --batched --workloads lenet --skip-memory --skip-extra
                                                      # + install_batched_sampling (flat node)

Measures, on CPU with one thread (interleaved rounds, median of per-round ratios), with
``torch.set_flush_denormal(True)`` unless ``--no-flush-denormal`` (denormal arithmetic slows
the deterministic baseline and deflates every ratio):
1. one training step (forward, cross-entropy + KL/N, backward, Adam), default estimator, on
   MLP 784-1200-1200-10 (batch 128), LeNet-5 (batch 64), ResNet-18 3x32x32 (batch 32), for
   dnn2bnn and, side by side when installed (``pip install .[bench]``), torchbnn 1.2
   (``BayesLinear``/``BayesConv2d`` swapped in for every Linear/Conv2d, means = the trained
   weights, ``sigma = exp(log_sigma)`` = 1e-3, its ``bayesian_kl_loss``) and bayesian-torch
   0.5 (``dnn_to_bnn``, Reparameterization);
2. Monte Carlo prediction with 16 samples against 16 deterministic passes:
   ``dnn2bnn.predict``, a plain loop of 16 forward passes of each library's BNN;
3. ResNet-18 with only ``fc`` Bayesian: 16-sample prediction against ONE deterministic pass;
4. conversion time of a ResNet-50 (median of 3);
5. peak training memory (growth of the peak RSS of a fresh subprocess, Linux; on CUDA the
   peak allocated GPU memory) relative to deterministic, for each library;
6. the same train step with ``torch.optim.Adam(fused=True)`` on both sides, and *floors*,
   ratios that any implementation drawing one fresh Gaussian per weight per step pays before
   doing anything else: noise, ``1 + t(randn over every Bayesian weight) / t(det. step)``
   (``1 + 16 t(randn) / t(16 det. passes)`` for MC); + the optimizer over the extra
   parameters, ``t(Adam step over the rho parameters) / t(det. step)``; + one ``exp`` pass
   over them (``sigma = exp(rho)``; its derivative is sigma itself and the KL's log sigma is
   rho, so no other transcendental pass is needed). The three passes of the softplus
   parametrization (``softplus``, ``sigmoid``, ``log``) are timed too, for reference.
``--keep-freed-memory`` tells glibc (Linux) to keep freed memory instead of returning it to the
system after every step (``mallopt``: no trimming, no ``mmap`` for large blocks), for every
library and the DNN alike: by default each step page-faults its large temporaries back in,
which costs a BNN (more large temporaries per weight) more than the DNN.
``--profile`` adds a torch.profiler table (sorted by self CPU time) of one training step of
each library, and the number of aten operations per training step (and per forward +
backward, without the optimizer) for the deterministic model and each BNN, also for MLPs of
increasing depth to show how the count grows with the number of Bayesian layers.
``--batched`` adds the BNN with ``dnn2bnn.layers.install_batched_sampling`` (the small
parameters' samples and KL from one flat node) as a column of the train step, the profiler
tables and the aten counts (issue 17), and counts non-view operations and fused-Adam steps too.
``--device cuda`` runs everything on the GPU (timings synchronised; no peer columns).
Prints tables; writes benchmarks/results/bench_speed.json.
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
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import dnn2bnn  # noqa: E402
from _common import (  # noqa: E402
    WORKLOADS, Workload, batch, interleaved, median_ratio, table, torchbnn_kl, torchbnn_model,
    train_step, write_json,
)

SAMPLES = 16
KL_SCALE = 1.0 / 60_000
TARGETS = {  # issue 17 (train, MC) and issue 8 (last layer, conversion, memory)
    "train": {"MLP 784-1200-1200-10": 2.0, "LeNet-5": 1.15, "ResNet-18 3x32x32": 1.6},
    "mc": {"MLP 784-1200-1200-10": 1.5, "LeNet-5": None, "ResNet-18 3x32x32": 1.6},
    "last_layer": 1.3,
    "resnet50_conversion_s": 1.0,
    "memory": 2.5,
}
PEERS = ("torchbnn", "bayesian-torch")
BATCHED = "dnn2bnn (batched)"
#: aten operations that only make views or metadata (not counted in the "non-view" column)
VIEW_OPS = frozenset({
    "view", "reshape", "_reshape_alias", "as_strided", "slice", "narrow", "split",
    "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "t", "transpose", "unsqueeze",
    "squeeze", "expand", "expand_as", "detach", "alias", "empty", "empty_like", "empty_strided",
    "select", "_unsafe_view", "permute", "view_as", "flatten", "unflatten", "lift_fresh",
})

try:  # optional comparison, never required
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn, get_kl_loss
except ImportError:  # pragma: no cover - depends on the environment
    dnn_to_bnn = get_kl_loss = None


def bayesian_torch_model(dnn: nn.Module) -> nn.Module | None:
    """A copy of ``dnn`` converted by bayesian-torch's ``dnn_to_bnn`` (its README settings)."""
    if dnn_to_bnn is None:
        return None
    import copy

    model = copy.deepcopy(dnn)
    dnn_to_bnn(model, {
        "prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
        "type": "Reparameterization", "moped_enable": False, "moped_delta": 0.5,
    })
    return model


def peer_model(tool: str, dnn: nn.Module) -> nn.Module | None:
    """The BNN of ``tool`` built from a copy of ``dnn``; ``None`` if the peer is not installed."""
    if tool == "dnn2bnn":
        return dnn2bnn.transform_to_bnn_model(dnn)
    if tool == BATCHED:
        bnn = dnn2bnn.transform_to_bnn_model(dnn)
        dnn2bnn.layers.install_batched_sampling(bnn)
        return bnn
    if tool == "torchbnn":
        return torchbnn_model(dnn)
    if tool == "bayesian-torch":
        return bayesian_torch_model(dnn)
    if tool == "deterministic":
        return dnn
    raise ValueError(f"unknown tool {tool!r}")


def loss_fn(tool: str) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy + KL / 60,000 with each library's own KL."""
    ce = nn.functional.cross_entropy
    if tool == "deterministic":
        return lambda model, x, y: ce(model(x), y)
    if tool in ("dnn2bnn", BATCHED):
        return lambda model, x, y: ce(model(x), y) + KL_SCALE * dnn2bnn.kl_divergence(model)
    if tool == "torchbnn":
        return lambda model, x, y: ce(model(x), y) + KL_SCALE * torchbnn_kl(model)
    return lambda model, x, y: ce(model(x), y) + KL_SCALE * get_kl_loss(model)


def step_of(tool: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
            optimizer: bool = True, fused: bool = False) -> Callable[[], None]:
    """One training step of ``tool``'s ``model`` (``optimizer=False``: forward + backward only)."""
    if tool in ("deterministic", "dnn2bnn", BATCHED) and optimizer:
        return train_step(model, x, y, None if tool == "deterministic" else KL_SCALE, fused=fused)
    loss = loss_fn(tool)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **({"fused": True} if fused else {}))
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss(model, x, y).backward()
        if optimizer:
            opt.step()

    return step


def mc_loop(model: nn.Module, x: torch.Tensor, samples: int = SAMPLES) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.no_grad():
            torch.stack([model(x).softmax(-1) for _ in range(samples)]).mean(0)

    return run


def mc_predict(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()
    return lambda: dnn2bnn.predict(model, x, num_samples=SAMPLES)


def one_pass(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
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


def best_mark(values: dict[str, float | None], tool: str) -> str:
    """``fmt`` of ``values[tool]``, bold when it is the smallest of the row."""
    value = values.get(tool)
    if value is None:
        return "n/a"
    known = [v for v in values.values() if v is not None]
    return f"**{value:.2f}x**" if value == min(known) and len(known) > 1 else f"{value:.2f}x"


def measure_memory(index: int, variant: str, flush: bool) -> float:
    """Max-RSS growth (MiB) of a fresh process doing 3 train steps of one variant."""
    # glibc keeps freed large blocks in the heap (dynamic mmap threshold), so the RSS would
    # show the allocator's high-water mark rather than live tensors; a fixed threshold makes
    # every large tensor its own mapping, returned on free. Same setting for every variant.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, __file__, "--_memory", str(index), variant,
         *([] if flush else ["--no-flush-denormal"])],
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
    model = peer_model(variant, workload.make().to(device))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step = step_of(variant, model, x, y)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model, step
    return peak / 2**20


def bayesian_counts(model: nn.Module) -> int:
    """Number of Bayesian weights (elements of the ``*_mu`` parameters) of a dnn2bnn model."""
    return sum(p.numel() for name, p in model.named_parameters() if name.endswith("_mu"))


def keep_freed_memory() -> None:
    """glibc: keep freed memory in the heap (no trimming, no ``mmap`` for large blocks), so a
    step does not page-fault the temporaries that the previous one freed. Process-wide."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1)):
        raise RuntimeError("bench_speed.py --keep-freed-memory: mallopt refused the settings (not glibc?)")


def noise(model: nn.Module, draws: int = 1) -> Callable[[], None]:
    """``torch.randn`` over as many numbers as ``model`` has Bayesian weights, ``draws`` times,
    one call per Bayesian tensor (as any layer-wise implementation draws them)."""
    shapes = [p.shape for name, p in model.named_parameters() if name.endswith("_mu")]
    device = next(model.parameters()).device

    def run() -> None:
        for _ in range(draws):
            for shape in shapes:
                torch.randn(shape, device=device)

    return run


def _rhos(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for name, p in model.named_parameters() if name.endswith("_rho")]


def exp_pass(model: nn.Module) -> Callable[[], None]:
    """``exp(rho)`` over every Bayesian weight: all the transcendental work that
    ``sigma = exp(rho)`` needs (dsigma/drho = sigma, log sigma = rho in the KL)."""
    rhos = _rhos(model)

    def run() -> None:
        for rho in rhos:
            torch.exp(rho)

    return run


def softplus_passes(model: nn.Module) -> Callable[[], None]:
    """``softplus(rho)``, ``sigmoid(rho)`` and ``log(sigma)`` over every Bayesian weight: the
    passes that ``sigma = softplus(rho)`` (forward), its derivative (backward) and the
    closed-form KL's ``sum(log sigma)`` need."""
    rhos = _rhos(model)

    def run() -> None:
        for rho in rhos:
            torch.log(torch.nn.functional.softplus(rho)).sum()
            torch.sigmoid(rho)

    return run


def rho_adam(model: nn.Module, fused: bool = False) -> Callable[[], None]:
    """One Adam step over the ``rho`` parameters alone: the optimizer work a Bayesian model
    adds (its means replace the deterministic weights one for one)."""
    clones = [torch.nn.Parameter(p.clone()) for p in _rhos(model)]
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
    model = peer_model(variant, workload.make())
    step = step_of(variant, model, x, y)
    for _ in range(3):
        step()
    print((_status_kib("VmHWM") - base) / 1024)


# ---------------------------------------------------------------- profiling (--profile)

def deep_mlp(depth: int, width: int = 256) -> nn.Module:
    """784 -> ``depth`` hidden layers of ``width`` -> 10 (``depth + 1`` Linear layers)."""
    layers: list[nn.Module] = []
    previous = 784
    for _ in range(depth):
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    return nn.Sequential(*layers, nn.Linear(previous, 10))


def aten_ops(fn: Callable[[], None], steps: int = 2, *, non_view: bool = False) -> float:
    """aten operations per call of ``fn`` (every ``aten::`` event recorded by torch.profiler,
    nested calls included: ``aten::linear`` and the ``aten::addmm`` it calls count twice);
    ``non_view``: without the view and metadata operations of ``VIEW_OPS``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return sum(
        e.count for e in prof.key_averages()
        if e.key.startswith("aten::") and not (non_view and e.key[6:] in VIEW_OPS)
    ) / steps


def profile_tables(workload: Workload, tools: list[str], device: str, rows: int = 15) -> None:
    """Print a profiler table (self CPU time) of 3 training steps of each library."""
    from torch.profiler import ProfilerActivity, profile

    x, y = batch(workload, device=device)
    dnn = workload.make().to(device)
    for tool in ["deterministic", *tools]:
        step = step_of(tool, peer_model(tool, dnn), x, y)
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 3e3
        print(f"\n### {workload.name}, {tool}: 3 training steps (self CPU {total:.1f} ms per step)\n")
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


def op_counts(workloads: list[Workload], tools: list[str], device: str) -> dict[str, dict]:
    """aten operations per training step (and per forward + backward) of every library."""
    cases = [(w.name, w.make, w) for w in workloads]
    cases += [(f"MLP depth {d} (width 256, batch 128)", (lambda d=d: deep_mlp(d)), WORKLOADS[0])
              for d in (2, 4, 8, 16)]
    counts: dict[str, dict] = {}
    for name, make, workload in cases:
        x, y = batch(workload, device=device)
        dnn = make().to(device)
        counts[name] = {}
        for tool in ["deterministic", *tools]:
            model = peer_model(tool, dnn)
            counts[name][tool] = {
                "step": aten_ops(step_of(tool, model, x, y)),
                "forward_backward": aten_ops(step_of(tool, model, x, y, optimizer=False)),
                "step_fused": aten_ops(step_of(tool, model, x, y, fused=True)),
            }
            counts[name][tool]["non_view"] = {
                "step": aten_ops(step_of(tool, model, x, y), non_view=True),
                "forward_backward": aten_ops(step_of(tool, model, x, y, optimizer=False), non_view=True),
                "step_fused": aten_ops(step_of(tool, model, x, y, fused=True), non_view=True),
            }
    return counts


def print_op_counts(counts: dict[str, dict], tools: list[str]) -> None:
    header = ["model", "DNN step (fwd+bwd)"] + [f"{t} step (fwd+bwd)" for t in tools]
    for title, get in (("", lambda c: c), (", non-view", lambda c: c["non_view"])):
        for key, label in (("step", "Adam"), ("step_fused", "Adam(fused=True)")):
            body = []
            for name, entry in counts.items():
                det = get(entry["deterministic"])
                cells = [f"{det[key]:.0f} ({det['forward_backward']:.0f})"]
                for tool in tools:
                    c = get(entry[tool])
                    cells.append(f"{c[key]:.0f} ({c['forward_backward']:.0f}); "
                                 f"+{c[key] - det[key]:.0f} (+{c['forward_backward'] - det['forward_backward']:.0f})")
                body.append([name, *cells])
            print(f"\naten operations{title} per training step with {label} (forward + backward "
                  "only), BNN: +extra over the DNN\n")
            print(table(header, body))


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 repetition")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--no-flush-denormal", dest="flush", action="store_false",
                        help="keep denormal arithmetic (the slower deterministic baseline)")
    parser.add_argument("--workloads", nargs="+", default=None, metavar="NAME",
                        help="only these workloads (prefix of the name, case-insensitive: mlp lenet resnet)")
    parser.add_argument("--skip-memory", action="store_true", help="no memory subprocesses")
    parser.add_argument("--skip-extra", action="store_true",
                        help="no last-layer and ResNet-50 conversion measurements")
    parser.add_argument("--profile", action="store_true",
                        help="profiler tables and aten ops per step (adds ~1 min)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory (mallopt): no page faults for the large temporaries of each step")
    parser.add_argument("--batched", action="store_true",
                        help="add the BNN with install_batched_sampling (train step, op counts)")
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    flushed = torch.set_flush_denormal(args.flush) and args.flush
    if args._memory:
        torch.set_flush_denormal(args.flush)
        _memory_child(int(args._memory[0]), args._memory[1])
        return
    rounds = args.rounds or (3 if args.quick else 10)
    reps = 1 if args.quick else 3
    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = args.device
    cuda = device.startswith("cuda")
    workloads = [w for w in WORKLOADS if args.workloads is None
                 or any(w.name.lower().startswith(p.lower()) for p in args.workloads)]
    available = {"torchbnn": torchbnn_model(nn.Linear(1, 1)) is not None,
                 "bayesian-torch": dnn_to_bnn is not None}
    peers = [p for p in PEERS if available[p] and not cuda]
    tools = ["dnn2bnn", *peers]
    results: dict = {"rounds": rounds, "reps": reps, "samples": SAMPLES, "targets": TARGETS,
                     "flush_denormal": flushed, "keep_freed_memory": args.keep_freed_memory, "tools": tools,
                     "device": torch.cuda.get_device_name() if cuda else "cpu"}
    print(f"{device}, {torch.get_num_threads()} thread, flush denormal {flushed}, keep freed memory {args.keep_freed_memory}, "
          f"{rounds} rounds x {reps}, tools: {', '.join(tools)}", file=sys.stderr, flush=True)
    rows, peer_rows = [], []
    for workload in workloads:
        index = WORKLOADS.index(workload)
        x, y = batch(workload, device=device)
        dnn = workload.make().to(device)
        models = {tool: peer_model(tool, dnn) for tool in tools}
        bnn = models["dnn2bnn"]
        dnn_f = workload.make().to(device)
        bnn_f = dnn2bnn.transform_to_bnn_model(dnn_f)
        train = {"deterministic": step_of("deterministic", dnn, x, y)}
        train |= {tool: step_of(tool, models[tool], x, y) for tool in tools}
        if args.batched:
            train[BATCHED] = step_of(BATCHED, peer_model(BATCHED, dnn), x, y)
        train |= {
            "deterministic (fused Adam)": train_step(dnn_f, x, y, None, fused=True),
            "dnn2bnn (fused Adam)": train_step(bnn_f, x, y, KL_SCALE, fused=True),
            "noise": noise(bnn),
            "rho Adam": rho_adam(bnn),
            "exp": exp_pass(bnn),
            "softplus, sigmoid, log": softplus_passes(bnn),
            "rho Adam (fused)": rho_adam(bnn, fused=True),
        }
        mc = {"deterministic": mc_loop(dnn, x), "dnn2bnn": mc_predict(bnn, x),
              "dnn2bnn (loop)": mc_loop(bnn, x)}
        mc |= {tool: mc_loop(models[tool], x) for tool in peers}
        mc["noise"] = noise(bnn, SAMPLES)
        train_times = interleaved(train, rounds=rounds, reps=reps)
        mc_times = interleaved(mc, rounds=rounds, reps=reps)

        def ratio(times: dict, key: str, base: str = "deterministic") -> float:
            return median_ratio(times, key, base)

        noise_r, adam_r = ratio(train_times, "noise"), ratio(train_times, "rho Adam")
        entry = {
            "train": {k: ratio(train_times, k) for k in tools + ([BATCHED] if args.batched else [])},
            "train_fused_adam": ratio(train_times, "dnn2bnn (fused Adam)", "deterministic (fused Adam)"),
            "train_noise_floor": 1 + noise_r,
            # noise + the optimizer over the extra (rho) parameters: paid by any implementation
            "train_floor": 1 + noise_r + adam_r,
            # + one exp pass: sigma = exp(rho) needs no other transcendental pass
            "train_floor_exp": 1 + noise_r + adam_r + ratio(train_times, "exp"),
            # for reference: + softplus, sigmoid and log (the softplus parametrization)
            "train_floor_softplus": 1 + noise_r + adam_r + ratio(train_times, "softplus, sigmoid, log"),
            "train_floor_fused_adam": 1 + ratio(train_times, "noise", "deterministic (fused Adam)")
            + ratio(train_times, "rho Adam (fused)", "deterministic (fused Adam)"),
            "mc": {k: ratio(mc_times, k) for k in mc if k not in ("deterministic", "noise")},
            "mc_noise_floor": 1 + ratio(mc_times, "noise"),
            "train_ms": {k: 1e3 * statistics.median(v) for k, v in train_times.items()},
            "mc_ms": {k: 1e3 * statistics.median(v) for k, v in mc_times.items()},
        }
        if not args.skip_memory:
            variants = ["deterministic", *tools]
            if cuda:
                entry["memory_mib"] = {v: cuda_memory(workload, v, device) for v in variants}
            else:
                entry["memory_mib"] = {v: measure_memory(index, v, args.flush) for v in variants}
            entry["memory"] = {
                v: entry["memory_mib"][v] / entry["memory_mib"]["deterministic"] for v in tools
            }
        results[workload.name] = entry
        target, mc_target = TARGETS["train"][workload.name], TARGETS["mc"][workload.name]
        rows.append([
            workload.name,
            f"{entry['train_ms']['deterministic']:.1f} ms",
            fmt(entry["train"]["dnn2bnn"], target) + f" (<= {target})",
            f"{entry['train_noise_floor']:.2f}x / {entry['train_floor']:.2f}x / "
            f"{entry['train_floor_exp']:.2f}x ({entry['train_floor_softplus']:.2f}x)",
            fmt(entry["train_fused_adam"], target) + f" ({entry['train_floor_fused_adam']:.2f}x)",
            f"{entry['mc_ms']['deterministic']:.1f} ms",
            fmt(entry["mc"]["dnn2bnn"], mc_target) + ("" if mc_target is None else f" (<= {mc_target})"),
            fmt(entry["mc"]["dnn2bnn (loop)"]),
            f"{entry['mc_noise_floor']:.2f}x",
            fmt(entry.get("memory", {}).get("dnn2bnn"), TARGETS["memory"]),
        ])
        train_cells = {t: entry["train"][t] for t in tools}
        mc_cells = {t: entry["mc"][t] for t in tools}
        peer_rows.append([
            workload.name,
            *(best_mark(train_cells, t) for t in tools),
            *(best_mark(mc_cells, t) for t in tools),
            *(fmt(entry.get("memory", {}).get(t)) for t in tools),
        ])
        if args.batched:
            print(f"{workload.name}: train step {entry['train']['dnn2bnn']:.3f}x the DNN, "
                  f"with install_batched_sampling {entry['train'][BATCHED]:.3f}x; batched/lazy "
                  f"{ratio(train_times, BATCHED, 'dnn2bnn'):.3f}", flush=True)
        print(f"done: {workload.name}", file=sys.stderr, flush=True)

    if not args.skip_extra:
        # 3. ResNet-18 with a Bayesian last layer: 16 samples vs ONE deterministic pass
        workload = WORKLOADS[2]
        x, _ = batch(workload, device=device)
        dnn = workload.make().to(device)
        last = dnn2bnn.transform_to_bnn_model(dnn, include="fc")
        variants = {"deterministic x1": one_pass(dnn, x), "loop x16": mc_loop(last, x),
                    "dnn2bnn.predict": mc_predict(last, x)}
        times = interleaved(variants, rounds=rounds, reps=1, warmup=1)
        results["last_layer"] = {k: median_ratio(times, k, "deterministic x1")
                                 for k in variants if k != "deterministic x1"}
        # 4. conversion time of ResNet-50
        resnet50 = torchvision.models.resnet50()
        conversions = []
        for _ in range(3):
            start = time.perf_counter()
            dnn2bnn.transform_to_bnn_model(resnet50)
            conversions.append(time.perf_counter() - start)
        results["resnet50_conversion_s"] = statistics.median(conversions)

    header = ["workload", "det. step", "train step",
              "floor: noise / +rho Adam / +exp (+softplus,sigmoid,log instead)",
              "train, fused Adam (floor)", "16 det. passes", "MC x16 predict", "MC x16 loop",
              "MC noise floor", "peak memory"]
    print(table(header, rows))
    print("\nRatios to the deterministic model in the same rounds (train step; MC x16 against 16 "
          "deterministic passes; memory); bold: the fastest library of the row\n")
    print(table(["workload", *(f"train: {t}" for t in tools), *(f"MC x16: {t}" for t in tools),
                 *(f"memory: {t}" for t in tools)], peer_rows))
    if not args.skip_extra:
        last_layer = results["last_layer"]
        print()
        print(table(["ResNet-18, Bayesian fc only: 16 samples vs ONE deterministic pass", "ratio"], [
            ["plain loop of 16 passes (reference)", fmt(last_layer["loop x16"])],
            ["dnn2bnn.predict", fmt(last_layer["dnn2bnn.predict"], TARGETS["last_layer"])],
        ]))
        print(f"\nResNet-50 conversion: {results['resnet50_conversion_s']:.3f} s (target < 1 s)")
    if args.profile:
        profiled = tools + ([BATCHED] if args.batched else [])
        for workload in workloads:
            profile_tables(workload, profiled, device)
        results["aten_ops"] = op_counts(workloads, profiled, device)
        print_op_counts(results["aten_ops"], profiled)
    path = write_json("bench_speed" + ("_cuda" if cuda else ""), results)
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
