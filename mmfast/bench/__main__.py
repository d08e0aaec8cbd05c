"""``python -m mmfast.bench``: mmfast beside the alternatives a user would pick.

Kernel suite: RMSNorm and LayerNorm (with and without the residual), the MMA adapter, the SwiGLU
gate and CLIP's QuickGELU, forward, backward and forward+backward, against HF eager, PyTorch native,
torch.compile, Liger (when importable) and mmfast. Sizes above the L2: RMSNorm at M = 32768, N in
{1024, 4096, 5120, 8192}; LayerNorm at CLIP widths with M = 64*577; the adapter at D = 4096; the gate at
LLaMA-7B's I = 11008; QuickGELU at CLIP-L's I = 4096 with M = 64*577;
small shapes timed as CUDA-graph replays. Model suite: a LLaVA-shaped training step (CLIP ViT-L/14
tower, projector, LLaMA layers at 7B widths; LLaVA-1.5's per-device batch of 16 samples of 1024 tokens)
under each tuning recipe: tokens/s and peak memory, HF eager vs mmfast (vs Liger).

Without a GPU: small CPU sizes and a tiny model, labelled as what they are (CPU timings, not GPU
performance). Writes results.json, results.csv, summary.md and PNG plots under --out.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Optional

import torch

from . import adapter as adapter_bench
from . import model as model_bench
from . import norm as norm_bench
from . import activation as activation_bench
from .cases import KERNEL_OPS, AdapterCase, NormCase, QuickGELUCase, SwiGLUCase
from .env import CPU_BANNER, environment
from .report import no_nan, table, write_csv, write_json, write_plots, write_summary_md
from .runner import record, time_case, time_cases_isolated
from .timing import copy_gbps

OPS = (*KERNEL_OPS, "model")


def kernel_cases(device: torch.device, quick: bool) -> list:
    bf16 = torch.bfloat16
    if quick:
        f32 = torch.float32
        return [NormCase("rms_norm", 64, 256, f32), NormCase("rms_norm", 64, 256, f32, residual=True),
                NormCase("layer_norm", 64, 256, f32), AdapterCase(2, 16, 128, f32), SwiGLUCase(64, 256, f32),
                QuickGELUCase(64, 256, f32)]
    if device.type != "cuda":
        f32 = torch.float32
        # small enough that the Triton interpreter's runs keep the default CPU run to a few minutes on two
        # cores (at M = 2048 it took 12): CPU timings say nothing about GPU performance either way
        return [NormCase("rms_norm", 256, n, f32, residual=r) for n in (1024, 4096) for r in (False, True)] + \
               [NormCase("layer_norm", 256, 768, f32, residual=r) for r in (False, True)] + \
               [AdapterCase(2, 128, 1024, f32), SwiGLUCase(256, 2752, f32), QuickGELUCase(256, 1024, f32)]
    clip_m = 64 * 577

    def rms(n, r):
        return NormCase("rms_norm", 32768, n, bf16, residual=r)

    def ln(n, r):
        return NormCase("layer_norm", clip_m, n, bf16, residual=r)

    # Run order (the report lists the cases in their own order): one case of every op first, at LLaMA-7B's and
    # CLIP-L's widths, so that a run --time-budget cuts short (a GPU lease's) still times each op; then the
    # other widths, the norm goals' widest first
    cases = [rms(4096, False), rms(4096, True), ln(1024, False), ln(1024, True), AdapterCase(64, 512, 4096, bf16),
             SwiGLUCase(16384, 11008, bf16),  # LLaMA-7B's MLP width
             QuickGELUCase(clip_m, 4096, bf16)]  # CLIP-L's MLP width, 64 images
    cases += [rms(n, r) for n in (8192, 5120, 1024) for r in (False, True)]
    cases += [ln(n, r) for n in (768, 1280) for r in (False, True)] + [AdapterCase(64, 577, 1024, bf16)]
    cases += [NormCase("rms_norm", 512, 4096, bf16, graphs=True), NormCase("rms_norm", 512, 4096, bf16, True, True),
              NormCase("layer_norm", 577, 1024, bf16, graphs=True), AdapterCase(1, 512, 4096, bf16, graphs=True)]
    return cases


def model_cases(device: torch.device, quick: bool, llm_layers: int, batch: int = model_bench.LLAVA_BATCH,
                tunings: tuple[str, ...] = model_bench.TUNINGS) -> list:
    if quick or device.type != "cuda":
        return [model_bench.tiny(t) for t in tunings]
    return [model_bench.llava_7b_widths(t, llm_layers, batch=batch, text_tokens=448) for t in tunings]


def _providers(case, device: torch.device, wanted: Optional[set] = None) -> list[str]:
    """The providers of ``case`` on ``device``: those run by default, plus the model suite's opt-in ones
    (:data:`mmfast.bench.model.OPT_IN`) named in ``wanted``."""
    if isinstance(case, NormCase):
        return norm_bench.providers(device)
    if isinstance(case, AdapterCase):
        return adapter_bench.providers(device)
    if isinstance(case, (SwiGLUCase, QuickGELUCase)):
        return activation_bench.providers(device, case)
    names = model_bench.providers(device, tuple(wanted or ()))
    return [n for n in names if not (n.startswith("liger") and case.tuning == "mma")]


def known_providers() -> set[str]:
    """Every provider name a suite can run, on any device (``--providers`` refuses other names)."""
    from ..ops.backend import BACKENDS

    return {"hf-eager", "torch-native", "torch.compile", "torch.compile-nomix", "liger", "lavin-eager",
            "mmfast", "mmfast-noloss", "liger-norms", *model_bench.OPT_IN, *(f"mmfast-{b}" for b in BACKENDS)}


#: The files a run writes into --out, replaced by --overwrite: these, and the plots (report.write_plots'
#: names: ``<op>_<dtype>.png``, ``model_train_step.png``); other files there are left alone.
OUTPUTS = ("results.json", "results.csv", "summary.md")
PLOT_NAME = re.compile(r"model_train_step\.png|[a-z_]+_(float32|float16|bfloat16)\.png")


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="mmfast.bench", unit="run", file=sys.stderr)
    except ImportError:
        return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmfast.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-results", help="output directory (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's results in --out (its results.*, summary.md and PNG plots); "
                        "without it a directory holding a previous run's outputs is refused before anything runs")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of %(default)s")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers, run in the order given within each case (and, on a GPU, "
                        "the CUDA-graph cases' per-provider processes in that order, so that the first named "
                        "ones run first under --time-budget; default: all available but the model suite's "
                        "hf-compile and mmfast-compile, which run only when named)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, a smoke run (seconds on a GPU; a minute or two of the Triton interpreter on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--llm-layers", type=int, default=None,
                   help="LLaMA layers in the model-level step (GPU, not --quick; default 8)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"samples per model-level step (GPU, not --quick; default {model_bench.LLAVA_BATCH}, LLaVA-1.5's "
                        "per-device batch; each is 576 image + 448 text tokens)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed training steps per model-level run (default 10 on a GPU, 3 on CPU; 2 with --quick, a smoke run)")
    p.add_argument("--tunings", default=",".join(model_bench.TUNINGS),
                   help="model suite: comma-separated tuning recipes to run (default: %(default)s)")
    p.add_argument("--sizes", choices=("all", "large", "small"), default="all",
                   help="kernel cases to run: large (above the L2, timed directly; with the model suite), small "
                        "(GPU: CUDA-graph replays; no model suite), or all (default). Separate processes keep a "
                        "failed capture from affecting the other cases")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop starting new runs this many seconds after the start (the CUDA C++ build and the copy's "
                        "timing included) and write what was measured; the runs left out are listed in the results, "
                        "and the exit status is 3 where nothing else went wrong (default: no limit)")
    p.add_argument("--backend-table", default=None, metavar="FILE",
                   help="also write the table MMFAST_BACKEND=auto uses to choose between the CUDA C++ and Triton "
                        "kernels on this GPU model, from this run's mmfast-cuda and mmfast-triton timings")
    return p


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # (--time-budget counts from here: the CUDA C++ build and the copy's timing count)
    p = _parser()
    args = p.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--batch", args.batch), ("--llm-layers", args.llm_layers)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.time_budget is not None and not args.time_budget > 0:
        p.error(f"--time-budget must be a positive number of seconds, got {args.time_budget:g}")

    if args.device is not None and not args.device.strip():
        p.error("--device: empty; pass cuda or cpu (or leave it out: cuda when available)")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if device.type not in ("cuda", "cpu"):
        p.error(f"--device must be cuda or cpu, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this PyTorch sees no CUDA GPU")
    if device.type == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA GPUs")
        # the timers (CUDA events, Triton's do_bench, the L2 flush) work on the current device
        if device.index is not None:
            torch.cuda.set_device(device.index)
        device = torch.device("cuda", torch.cuda.current_device())
    if args.backend_table and device.type != "cuda":
        p.error(f"--backend-table: the table is made from GPU timings of both backends; this run is on {device.type}")
    if args.steps is None:  # (on CPU each step runs the Triton interpreter: seconds)
        args.steps = 2 if args.quick else (10 if device.type == "cuda" else 3)
    ops = set(args.ops.split(","))
    unknown_ops = ops - set(OPS)
    if unknown_ops:
        p.error(f"unknown ops {sorted(unknown_ops)}; choose from {OPS}")
    cases = [c for c in kernel_cases(device, args.quick) if c.op in ops
             and (args.sizes == "all" or getattr(c, "graphs", False) == (args.sizes == "small"))]
    tunings = tuple(dict.fromkeys(args.tunings.split(",")))  # (a tuning named twice runs once)
    unknown_tunings = set(tunings) - set(model_bench.TUNINGS)
    if unknown_tunings:
        p.error(f"unknown tunings {sorted(unknown_tunings)}; choose from {model_bench.TUNINGS}")
    if "model" in ops and args.sizes != "small":  # (the model suite has no CUDA-graph case)
        sized = [f for f, v in (("--batch", args.batch), ("--llm-layers", args.llm_layers)) if v is not None]
        if sized and (args.quick or device.type != "cuda"):  # (they size the LLaVA-7B-width step only)
            print(f"note: {' and '.join(sized)} size the GPU model step; this run "
                  f"({'--quick' if args.quick else 'cpu'}) times the tiny model, which they do not change",
                  file=sys.stderr)
        cases += model_cases(device, args.quick, 8 if args.llm_layers is None else args.llm_layers,
                             model_bench.LLAVA_BATCH if args.batch is None else args.batch, tunings)
    if args.providers is not None and not args.providers.strip():
        p.error("--providers: empty; name providers (or leave it out: all available)")
    named = list(dict.fromkeys(args.providers.split(","))) if args.providers else []  # in the order to run them
    wanted = set(named) or None
    if wanted is not None and wanted - known_providers():
        p.error(f"unknown providers {sorted(wanted - known_providers())}; known: {sorted(known_providers())}")
    if not cases:
        why = ""
        if args.sizes == "small":
            why = " (the small shapes are CUDA-graph cases, GPU only)" if device.type != "cuda" else \
                " (--quick has no CUDA-graph cases)"
        p.error(f"nothing to run: --sizes {args.sizes} has no case of {sorted(ops)} on {device.type}{why}")
    # before the plan: asking which providers can run builds the CUDA C++ extension on first use (a minute)
    created = not os.path.exists(args.out)
    _check_out(p, args.out, args.backend_table, args.overwrite)
    plan = [(c, prov) for c in cases
            for prov in sorted(_providers(c, device, wanted), key=lambda q: named.index(q) if q in named else -1)
            if wanted is None or prov in wanted]
    if not plan:
        if created and not os.listdir(args.out):
            os.rmdir(args.out)
        here = {}
        for c in cases:
            here.setdefault(c.op, set()).update(_providers(c, device, None))
        p.error("nothing to run: no selected case has any of the requested providers on "
                f"{device.type}; available here: "
                + "; ".join(f"{op}: {', '.join(sorted(provs)) or 'none'}" for op, provs in sorted(here.items())))
    if wanted is not None:
        absent = sorted(wanted - {prov for _, prov in plan})
        if absent:
            print(f"[mmfast.bench] not run here (not available on {device.type}, or no selected case has them): "
                  f"{', '.join(absent)}", file=sys.stderr)
        dropped = sorted({c.op for c in cases} - {c.op for c, _ in plan})
        if dropped:
            print(f"[mmfast.bench] not run: {', '.join(dropped)} (none of the requested providers runs it here)",
                  file=sys.stderr)
    if device.type != "cuda":
        print(CPU_BANNER, file=sys.stderr)

    lock = _lock_out(p, args.out)
    try:
        # (again, under the lock: a run that finished into --out since the first check is a previous run)
        _check_out(p, args.out, args.backend_table, args.overwrite)
        threads = torch.get_num_threads()
        if device.type != "cuda":
            # one thread: with two on a machine that other work shares, a call's time jumped by 100x at random
            torch.set_num_threads(1)
        try:
            return _run(args, device, plan, started)
        finally:
            torch.set_num_threads(threads)
    finally:
        os.unlink(lock)
        if created and os.path.isdir(args.out) and not os.listdir(args.out):  # (a run stopped before it wrote anything)
            os.rmdir(args.out)


#: The exit status of a run whose --time-budget left runs out (and nothing else went wrong): a planned cut
#: that a script can tell from a failure
BUDGET_CUT = 3

#: In --out while a run uses it: the pid of that run.
LOCK_NAME = ".mmfast-bench.lock"


def _lock_out(p: argparse.ArgumentParser, out: str) -> str:
    """Claim ``out`` for this run (two runs into one directory each replaced the other's files at its end,
    mixing their results and plots); a lock whose process is gone is taken over. Returns the lock's path."""
    path = os.path.join(out, LOCK_NAME)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and pid != os.getpid() and _alive(pid):
                p.error(f"--out {out}: another mmfast.bench run (pid {pid}) is writing there; wait for it, or "
                        "--out another directory")
            try:  # its run is gone (killed): the lock is stale
                os.unlink(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return path
    p.error(f"--out {out}: could not claim it for this run ({path} keeps coming back)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _run(args, device, plan, started: float) -> int:
    with _sigterm_as_interrupt():
        try:  # (seconds: the copy's bandwidth, and on a GPU the CUDA C++ build a provider check may start)
            env = environment(device)
            copy = copy_gbps(device, (1 << 30) if device.type == "cuda" else (1 << 26))
        except KeyboardInterrupt as e:
            print(f"\n[mmfast.bench] interrupted ({str(e) or 'Ctrl-C'}) before the first measurement: nothing "
                  f"was timed, and nothing written to {args.out}", file=sys.stderr)
            return 130
    records: list[dict] = []
    not_run: list[str] = []
    interrupted = None
    partial = _Partial(args.out, {**env, "copy_gbps": copy, "gpu": device.type == "cuda", "quick": args.quick})
    bar = _progress(len(plan))
    groups = _groups(plan, device)
    done = 0

    def label(group):
        return [f"{case.name} M={case.M} N={getattr(case, 'N', '-')} {prov}" for case, prov in group]

    with _sigterm_as_interrupt():
        try:
            for done, group in enumerate(groups):
                if args.time_budget is not None and time.monotonic() - started > args.time_budget:
                    not_run += label(group)
                    if bar is not None:
                        bar.update(len(group))
                    continue
                case, prov = group[0]
                if bar is not None:
                    own = getattr(case, "graphs", False) and device.type == "cuda"
                    bar.set_postfix_str(f"{case.name} N={case.N} {prov}" + (" (CUDA graphs, own process)" if own else ""))
                if isinstance(case, model_bench.ModelCase):
                    new = [_model_record(case, prov, device, env, args.steps)]
                elif getattr(case, "graphs", False) and device.type == "cuda":
                    new = time_cases_isolated([c for c, _ in group], prov, device, copy, env)
                else:
                    new = time_case(case, prov, device, copy, env)
                records += new
                partial.add(new)
                if bar is not None:
                    bar.update(len(group))
            done = len(groups)
        except KeyboardInterrupt as e:
            interrupted = str(e) or "Ctrl-C"
            for group in groups[done:]:
                not_run += label(group)
        finally:
            partial.close()  # (an exception leaves the file, with what was measured, closed)
            if bar is not None:
                bar.close()

    partial.remove()  # (the outputs hold every record from here on)
    with _signals_deferred() as deferred:  # from here to the end: the outputs are written whole
        return _finish(args, device, env, copy, records, not_run, interrupted, plan, deferred)


def _finish(args, device, env, copy, records, not_run, interrupted, plan, deferred) -> int:
    """Print the results and write the outputs (SIGINT / SIGTERM deferred by the caller)."""
    meta = {**env, "copy_gbps": copy, "gpu": device.type == "cuda", "quick": args.quick}
    if not_run:
        meta["not_run"] = not_run
        meta["not_run_reason"] = f"interrupted ({interrupted})" if interrupted else f"--time-budget {args.time_budget:g} s"
        print(f"{meta['not_run_reason']}: {len(not_run)} of {len(plan)} runs not measured "
              "(listed in results.json under not_run and in summary.md)", file=sys.stderr)
    if interrupted:
        meta["interrupted"] = interrupted
    if device.type != "cuda":
        meta["note"] = CPU_BANNER
    if device.type != "cuda":
        meta["cpu_threads"] = torch.get_num_threads()
    # the files first, then the console: a reader that went away (``| head``) must not cost the results
    out, failed, kept = args.out, None, None
    if interrupted and args.overwrite and _previous_run(out) is not None:
        # an interrupted run does not replace a whole one: its records go into a directory beside it
        kept = out
        parent = os.path.dirname(os.path.abspath(out))
        out = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(out)) + "-interrupted-", dir=parent)
    try:
        plots = _write_outputs(out, meta, records, device, args.overwrite and kept is None)
    except OSError as e:  # the measurements are not lost with the directory
        failed = e
        out = tempfile.mkdtemp(prefix="mmfast-bench-")
        plots = _write_outputs(out, meta, records, device, False)
    table_said = None
    if args.backend_table and not interrupted and failed is None:
        table_said = _write_backend_table(args.backend_table, device, env, records, out)
    try:
        print(f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
        print(f"device-to-device copy: {copy:.1f} GB/s (read + write); %copy = achieved GB/s / that")
        print(table(records))
        if device.type != "cuda":
            print("\n" + CPU_BANNER)
        else:
            from .goals import goal_lines, of_run

            print("\ngoals (mmfast/bench/goals.py):")
            print("\n".join("  " + line for line in goal_lines(of_run(records, args.quick))))
        print(f"\nwrote {out}/results.json, results.csv, summary.md"
              + (f" and {plots} plot{'s' if plots != 1 else ''}" if plots else ""))
        if table_said:
            print(table_said)
        sys.stdout.flush()
    except BrokenPipeError:  # nobody reads the console any more: the files hold it all
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if failed is not None:
        print(f"\n[mmfast.bench] could not write to --out {args.out} ({failed}); the results are in {out}",
              file=sys.stderr)
    if kept is not None:
        print(f"\n[mmfast.bench] interrupted: the previous run in --out {kept} is kept (--overwrite replaces it "
              f"with a whole run only); this run's {len(records)} records are in {out}", file=sys.stderr)
    if deferred.signal is not None:
        print(f"[mmfast.bench] {deferred.signal} while writing the outputs: they were completed first", file=sys.stderr)
    if interrupted or deferred.signal is not None:
        return 130
    table_missing = bool(args.backend_table) and not (table_said or "").startswith("wrote")
    if any(r["error"] for r in records) or failed is not None or table_missing:
        return 1
    return BUDGET_CUT if not_run else 0  # (not_run without an interruption: the time budget's cut)


def _write_outputs(out: str, meta: dict, records: list[dict], device: torch.device, overwrite: bool) -> int:
    """results.json, results.csv, the plots and summary.md into ``out`` (returns how many plots): written whole into a directory
    beside them first, then moved in. With ``overwrite`` a previous run's files go just before the move,
    once there is a whole run to replace them with; a write that fails leaves ``out`` as it was."""
    os.makedirs(out, exist_ok=True)
    stage = tempfile.mkdtemp(dir=out, prefix=".mmfast-bench-")
    try:
        write_json(os.path.join(stage, "results.json"), meta, records)
        write_csv(os.path.join(stage, "results.csv"), records,
                  note="" if device.type == "cuda" else "CPU timing, not GPU performance")
        plots = write_plots(stage, meta, records)
        write_summary_md(os.path.join(stage, "summary.md"), meta, records, plots)
        if overwrite:
            for name in _previous_files(out):
                os.remove(os.path.join(out, name))
        for name in os.listdir(stage):
            os.replace(os.path.join(stage, name), os.path.join(out, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return len(plots)


class _signals_deferred:
    """SIGINT and SIGTERM wait (the first one is kept in ``signal``) until the block ends: a stop while the
    outputs are written would leave some of them out, and nothing in them would say so. A second one
    stops at once."""

    signal = None

    def __enter__(self):
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            def keep(signum, frame):
                if self.signal is not None:  # a second one: the writes hang, say; stop now
                    raise KeyboardInterrupt(signal.Signals(signum).name)
                self.signal = signal.Signals(signum).name

            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, keep)
        return self

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)
        return False


class _sigterm_as_interrupt:
    """SIGTERM (a job scheduler's stop, ``timeout``) raises KeyboardInterrupt in the main thread, so a
    stopped run still writes what it measured."""

    def __enter__(self):
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            def stop(signum, frame):
                raise KeyboardInterrupt("SIGTERM")

            self.old = signal.signal(signal.SIGTERM, stop)
        return self

    def __exit__(self, *exc):
        if self.installed:  # a handler installed from C reads back as None: the default is what stands for it
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.old is None else self.old)
        return False


def _previous_files(out: str) -> list[str]:
    """The files of a previous run in ``out``: the outputs, the plots the bench names, and the records a
    killed run left (:class:`_Partial`)."""
    plots = [os.path.basename(f) for f in glob.glob(os.path.join(glob.escape(out), "*.png"))]
    partial = [os.path.basename(f) for f in glob.glob(os.path.join(glob.escape(out), "records.partial.*.jsonl"))]
    return [name for name in [*OUTPUTS, *(f for f in plots if PLOT_NAME.fullmatch(f)),
                              *(f for f in partial if PARTIAL_NAME.fullmatch(f))]
            if os.path.isfile(os.path.join(out, name))]


#: :class:`_Partial`'s file in --out
PARTIAL_NAME = re.compile(r"records\.partial\.\d+-\d+\.jsonl")


class _Partial:
    """``records.partial.<pid>-<ns>.jsonl`` in --out while a run measures: a JSON line of the run's meta, then one
    per record as it is measured; removed once the run has them all in hand to write its outputs. A run
    killed where it cannot write them (SIGKILL after a hang inside a kernel or a compile, where SIGINT waits
    for the C code to return) leaves what it measured there; ``python -m mmfast.bench.goals`` reads it as it
    reads a results.json, and a later run into --out counts it as a previous run's file."""

    def __init__(self, out: str, meta: dict):
        # (a name of this run's own: a killed run's file is never reopened, by a run in the same process either)
        self.path = os.path.join(out, f"records.partial.{os.getpid()}-{time.time_ns()}.jsonl")
        self.file = None
        try:
            self.file = open(self.path, "x")
        except OSError as e:
            self._lost(e)
        self.add([{"meta": {**meta, "partial": "the records a run measured before it was stopped "
                                               "without writing its outputs"}}])

    def _lost(self, e: OSError) -> None:
        print(f"[mmfast.bench] cannot keep the records in {self.path} as they are measured ({e.strerror or e}); "
              "they are written at the end only", file=sys.stderr)
        self.close()

    def add(self, objs: list) -> None:
        """Append these records (or the meta's line), a JSON line each."""
        if self.file is None:
            return
        try:
            self.file.write("".join(json.dumps(no_nan(o), allow_nan=False) + "\n" for o in objs))
            self.file.flush()
        except OSError as e:
            self._lost(e)

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None

    def remove(self) -> None:
        self.close()
        try:
            os.remove(self.path)
        except OSError:
            pass


def _previous_run(out: str) -> Optional[str]:
    """What the results.json in ``out`` says about its run (a previous run's other files alone: "results.json
    missing"), or None when there is none."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        left = _previous_files(out)
        return f"results.json missing; {', '.join(left[:3])}{' ...' if len(left) > 3 else ''}" if left else None
    try:
        with open(path) as f:
            meta = json.load(f).get("meta", {})
        return f"{meta.get('device', '?')}, commit {meta.get('commit', '?')}"
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def _check_out(p: argparse.ArgumentParser, out: str, backend_table: Optional[str], overwrite: bool = False) -> None:
    """Fail before the run, not after it, where the results could not be written or would replace a
    previous run's without being asked to (``overwrite``)."""
    if os.path.exists(out) and not os.path.isdir(out):
        p.error(f"--out {out}: exists and is not a directory")
    if backend_table:
        parent = os.path.dirname(os.path.abspath(backend_table))
        # (in --out, which is created below and checked for writing there)
        if os.path.isdir(backend_table) or (parent != os.path.abspath(out) and (
                not os.path.isdir(parent) or not os.access(parent, os.W_OK))):
            p.error(f"--backend-table {backend_table}: cannot write a file there")
    previous = _previous_run(out) if os.path.isdir(out) else None
    if previous is not None:
        if not overwrite:
            p.error(f"--out {out}: holds a previous run ({previous}); pass --overwrite to replace it, or "
                    "--out another directory")
        # (removed just before the new outputs are written: a run that fails or stops early keeps them)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        p.error(f"--out {out}: cannot create it ({e.strerror})")
    try:  # a file written and removed: access() answers yes for root on read-only mounts and sysfs
        with tempfile.NamedTemporaryFile(dir=out, prefix=".mmfast-write-check-"):
            pass
    except OSError as e:
        p.error(f"--out {out}: not writable ({e.strerror or e})")


def _groups(plan: list, device: torch.device) -> list[list]:
    """The plan in run order, one run a group, except on a GPU, where each provider's CUDA-graph cases
    form one group that runs in a fresh process (after a failed capture, PyTorch's CUDA generator stays
    in capture mode, and every later random tensor in that process fails)."""
    groups, graph_groups = [], {}
    for case, prov in plan:
        if getattr(case, "graphs", False) and device.type == "cuda":
            if prov not in graph_groups:
                graph_groups[prov] = []
                groups.append(graph_groups[prov])
            graph_groups[prov].append((case, prov))
        else:
            groups.append([(case, prov)])
    return groups


def _write_backend_table(path: str, device: torch.device, env: dict, records: list[dict], out: str) -> str:
    """Write the backend table to ``path``; returns the line to print ("wrote ..."), or says on stderr why
    nothing was written and returns ""."""
    import json

    from ..ops.backend_table import build_table

    meta = {k: env[k] for k in ("torch", "triton", "commit") if k in env}
    meta["source"] = os.path.join(out, "results.json")
    table = build_table(records, env["device"], meta)
    if not table["entries"]:
        print(f"--backend-table: {path} not written, no case was timed with both mmfast-cuda and mmfast-triton",
              file=sys.stderr)
        return ""
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    wins = sum(e["winner"] == "cuda" for e in table["entries"])
    return f"wrote {path}: CUDA C++ faster in {wins} of {len(table['entries'])} (op, direction, dtype, N) classes"


def _model_record(case, provider: str, device: torch.device, env: dict, steps: int) -> dict:
    try:
        res = model_bench.time_train_step(case, provider, device, steps=steps, warmup=2 if device.type != "cuda" else 3)
    except Exception as e:  # noqa: BLE001 - reported in the results, never hidden
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"[mmfast.bench] {provider} failed on {case.name}: {msg}", file=sys.stderr)
        return record(case, provider, "train-step", None, None, None, env, error=msg, tuning=case.tuning)
    return record(case, provider, "train-step", res["ms"], None, res["peak_mem_bytes"], env,
                  host_ms=res["host_ms"], tokens_per_s=res["tokens_per_s"], trainable=res["trainable"],
                  tuning=case.tuning, backends=res["backends"],
                  llm_layers=case.llm_layers, saved_bytes=(res["saved"] or {}).get("total"),
                  **{f"saved_bytes_{k}": v for k, v in (res["saved"] or {}).items() if k != "total"})


def _interpreted_cpu_run(argv: list[str]) -> bool:
    """Whether ``python -m mmfast.bench ARGV`` times on the CPU without ``TRITON_INTERPRET`` set: that run
    should time mmfast's Triton kernels through the interpreter, as the tests run them (not its pure-PyTorch
    reference), and Triton reads the variable when it is first imported (torch imports it)."""
    if "TRITON_INTERPRET" in os.environ or any(a in ("-h", "--help") for a in argv):
        return False
    device = _parser().parse_known_args(argv)[0].device
    if device is None:
        return not torch.cuda.is_available()
    try:
        return torch.device(device).type == "cpu"  # cpu:0 too
    except RuntimeError:
        return False  # main refuses it


if __name__ == "__main__":
    if _interpreted_cpu_run(sys.argv[1:]):
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "mmfast.bench", *sys.argv[1:]])
    sys.exit(main())
