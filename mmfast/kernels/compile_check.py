"""Compile every Triton kernel for a GPU target without a GPU: ``python -m mmfast.kernels.compile_check``.

The Triton interpreter (how the CPU tests run the kernels) accepts code that the real compiler
rejects (a tensor first defined inside a loop and used after it, say), and says nothing of register
pressure. This compiles a representative set of specializations of each kernel, with the block
sizes and warps the launchers choose, down to a cubin for ``--arch`` (default sm_90), and reports
registers, stack and local memory per kernel from ``cuobjdump`` and the shared memory the pipelined
tiles take. Each variant is specialized as Triton's JIT specializes a launch with those arguments (an
int that divides by 16, or a 16-byte aligned pointer, is known to; an int of 1 is a constant), so what
is compiled is what runs. Any compile error, shared memory beyond what the target gives a block, or
a 16- or 8-bit global load or store (an access not vectorized) where every pointer and width is
aligned and the tile gives each thread 16 bytes, fails (exit 1); spills are reported, and fail with
``--no-spills``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ptr:
    """A pointer argument: a tensor of ``dtype`` whose address is 16-byte aligned (as torch's allocations
    are) or, with ``aligned=False``, not (a view that starts one element in)."""

    dtype: torch.dtype
    aligned: bool = True


#: Shared memory one block may use (bytes), per compute capability x 10.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def _stand_in(v):
    """A launch argument Triton's JIT specializes as it would the one ``v`` stands for."""
    if not isinstance(v, Ptr):
        return v
    t = torch.empty(64 // v.dtype.itemsize, dtype=v.dtype)
    assert t.data_ptr() % 16 == 0
    return t if v.aligned else t[1:]


def specialize(fn, args: dict, options: dict, target) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of what Triton's JIT compiles for a launch of ``fn`` with ``args``:
    its own binder types every argument and marks what it knows (``tt.divisibility`` 16 for a pointer
    16-byte aligned and an int that divides by 16; an int of 1 becomes a constant). Without the marks the
    compiler cannot prove 16-byte access and compiles other code (per-element loads, other registers)."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    missing = [p.name for p in fn.params if p.name not in args]
    if missing:
        raise KeyError(f"{fn.__name__}: no value for {', '.join(missing)}")
    for p in fn.params:
        if not p.is_constexpr and isinstance(args[p.name], bool):
            raise TypeError(f"{fn.__name__}: {p.name} is a bool but not constexpr")
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    _, spec, _ = binder(**{k: _stand_in(v) for k, v in args.items()}, **options)
    sig, consts, attrs = {}, {}, {}
    for i, (p, (kind, key)) in enumerate(zip(fn.params, spec)):
        sig[p.name] = kind
        if kind == "constexpr":
            consts[(i,)] = key
        elif isinstance(key, str) and backend.parse_attr(key):
            attrs[(i,)] = backend.parse_attr(key)
    return sig, consts, attrs


def aligned(fn, args: dict) -> bool:
    """Whether every pointer of a launch is 16-byte aligned and every int argument divides by 16 (or is 1,
    a constant): the specialization in which whole rows can be read in 16-byte vectors."""
    return all(v.aligned if isinstance(v, Ptr) else v == 1 or v % 16 == 0 for p in fn.params
               for v in [args[p.name]] if not p.is_constexpr and isinstance(v, (Ptr, int)))


#: The constexpr tile sizes of the kernels: rows and columns of the tile a program moves at once.
_TILE = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_P", "ROWS", "BLOCK")


def vectorizable(fn, args: dict, num_warps: int) -> bool:
    """Whether a launch's global accesses can all be 16-byte vectors: it is :func:`aligned`, and its tile (the
    product of its tile sizes, in its narrowest dtype) gives each thread at least 16 bytes. (The adapter's
    narrowest tiles, 16 x 16 for the widest hidden x experts, give a thread one element.)"""
    elems = 1
    for k in _TILE:
        elems *= args.get(k) or 1
    elt = min(v.dtype.itemsize for v in args.values() if isinstance(v, Ptr))
    return aligned(fn, args) and elems * elt >= 16 * 32 * num_warps


#: A global load or store in PTX: ``ld.global.v4.b32``, ``st.global.L1::evict_last.b16``, ...
_GLOBAL_ACCESS = re.compile(r"\b(?:ld|st)\.global((?:\.[\w:]+)+)")


def narrow_accesses(ptx: str) -> int:
    """The global loads and stores in ``ptx`` of one 8- or 16-bit element (not a ``.v2``/``.v4`` vector)."""
    n = 0
    for mods in _GLOBAL_ACCESS.findall(ptx):
        parts = mods.split(".")[1:]
        if parts[-1] in ("b8", "u8", "s8", "b16", "u16", "s16", "f16", "bf16") and \
                not any(re.fullmatch(r"v\d+", m) for m in parts):
            n += 1
    return n


def _norm_fwd(K, rms, dt, wdt, N, res=False, has_w=True, has_b=None):
    """The forward kernel the launcher picks for width N: (kernel, args, warps)."""
    f32, has_b = torch.float32, (not rms) if has_b is None else has_b
    cfg = K.fwd_launch(32768, N)
    args = dict(X=Ptr(dt), stride_x=N, R=Ptr(dt) if res else None, stride_r=N, W=Ptr(wdt) if has_w else None,
                B=Ptr(wdt) if has_b else None, Y=Ptr(dt), RES_OUT=Ptr(dt) if res else None,
                MEAN=None if rms else Ptr(f32), RSTD=Ptr(f32), M=32768, N=N, eps=1e-6, IS_RMS=rms, HAS_W=has_w,
                HAS_B=has_b, HAS_RES=res, BLOCK_N=cfg.block_n, SOFT_RNE=False)
    if cfg.wide:
        return K._norm_fwd_wide_kernel, args, cfg.num_warps
    return K._norm_fwd_kernel, {**args, "BLOCK_M": cfg.block_m}, cfg.num_warps


def _norm_bwd(K, rms, dt, wdt, N, need_dx=True, dres=False, has_w=True, need_dw=True, need_db=None, rowdot=True):
    """The backward kernels the launcher picks for width N (the row-dot kernel first on wide rows, where
    ``rowdot``): [(kernel, args, warps)]."""
    f32, need_db = torch.float32, (not rms) if need_db is None else need_db
    cfg = K.bwd_launch(32768, N, torch.device("cpu"))
    common = dict(DY=Ptr(dt), stride_dy=N, X=Ptr(dt), stride_x=N, W=Ptr(wdt) if has_w else None,
                  MEAN=None if rms else Ptr(f32), RSTD=Ptr(f32))
    args = dict(common, DRES=Ptr(dt) if dres else None, stride_dres=N, DX=Ptr(dt) if need_dx else None,
                DW_PART=Ptr(f32) if need_dw else None, DB_PART=Ptr(f32) if need_db else None, M=32768, N=N,
                IS_RMS=rms, HAS_W=has_w, HAS_DRES=dres, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
                BLOCK_N=cfg.block_n, SOFT_RNE=False)
    if not cfg.wide:
        args = {**args, "BLOCK_M": cfg.block_m, "PREFETCH": cfg.prefetch, "KEEP_W": cfg.keep_w}
        return [(K._norm_bwd_kernel, args, cfg.num_warps)]
    dot = [(K._norm_bwd_rowdot_kernel, dict(common, C=Ptr(f32), N=N, IS_RMS=rms, HAS_W=has_w, BLOCK_N=cfg.block_n),
            cfg.num_warps)] if rowdot else []
    return dot + [(K._norm_bwd_wide_kernel, {**args, "C": Ptr(f32)}, cfg.num_warps)]


def _norm_variants():
    from . import norm as K

    bf16, f32 = torch.bfloat16, torch.float32
    for rms in (True, False):
        for dt, wdt in ((bf16, f32), (bf16, bf16), (f32, f32)):
            for N in (768, 4096, 8192, 20000):
                for res in (False, True):
                    yield _norm_fwd(K, rms, dt, wdt, N, res)
                for need_dx, dres in ((True, False), (True, True), (False, False)):
                    variants = _norm_bwd(K, rms, dt, wdt, N, need_dx, dres)
                    yield from variants
                    fn, args, warps = variants[-1]
                    if fn is K._norm_bwd_kernel and (dt, wdt) == (bf16, f32) and need_dx and not dres:
                        # the other loop shapes benchmarks/tune_norm.py can enter in K.TUNED
                        for prefetch, keep_w in ((True, True), (True, False), (False, False)):
                            yield fn, {**args, "PREFETCH": prefetch, "KEEP_W": keep_w}, warps
    # a norm without a weight (or a bias), and frozen affine parameters: the flags' other branches
    for rms in (True, False):
        for N in (4096, 20000):
            for has_b in (False, True) if not rms else (False,):
                yield _norm_fwd(K, rms, bf16, f32, N, has_w=False, has_b=has_b)
            grads = [(False, False, False), (True, False, False)]  # (HAS_W, NEED_DW, NEED_DB)
            if not rms:
                grads += [(False, False, True), (True, False, True), (True, True, False)]
            for has_w, need_dw, need_db in grads:  # (one row-dot kernel per weight flag)
                yield from _norm_bwd(K, rms, bf16, f32, N, has_w=has_w, need_dw=need_dw, need_db=need_db,
                                     rowdot=not need_dw and not need_db)
    # rows off 16 bytes, compiled without the alignment marks: a width that does not divide by 16, and a view
    # that starts one element in (x[:, 1:]: the row stride then does not divide either)
    for rms in (True, False):
        yield _norm_fwd(K, rms, bf16, f32, 1000)
        yield from _norm_bwd(K, rms, bf16, f32, 1000)
        off = {"X": Ptr(bf16, aligned=False), "stride_x": 4097}
        fn, args, warps = _norm_fwd(K, rms, bf16, f32, 4096)
        yield fn, {**args, **off}, warps
        for fn, args, warps in _norm_bwd(K, rms, bf16, f32, 4096):
            yield fn, {**args, **off}, warps


def _common_variants():
    from . import _common as K

    for out in (torch.float32, torch.bfloat16):
        yield K._sum_partials_kernel, dict(PART=Ptr(torch.float32), OUT=Ptr(out), P=264, N=4096, CHUNK=264, STEP=1,
                                           OUT_STRIDE=0, BLOCK_P=32, BLOCK_N=256, SOFT_RNE=False), 4
        # the split sum's second pass, over every chunk's first row
        yield K._sum_partials_kernel, dict(PART=Ptr(torch.float32), OUT=Ptr(out), P=33, N=1024, CHUNK=33, STEP=32,
                                           OUT_STRIDE=0, BLOCK_P=32, BLOCK_N=256, SOFT_RNE=False), 4
    # its first pass: the chunks' sums in place
    yield K._sum_partials_kernel, dict(PART=Ptr(torch.float32), OUT=Ptr(torch.float32), P=1056, N=1024, CHUNK=32,
                                       STEP=1, OUT_STRIDE=32 * 1024, BLOCK_P=32, BLOCK_N=256, SOFT_RNE=False), 4


#: (x dtype, weight dtype, hidden R, experts E, width D) of the adapter variants; the last three: wide hidden x
#: many experts (the tiles fit() narrows for registers: 512, 256 and 1024 extended slots).
ADAPTER_SHAPES = ((torch.bfloat16, torch.float32, 8, 2, 1024), (torch.bfloat16, torch.float32, 8, 2, 4096),
                  (torch.bfloat16, torch.bfloat16, 8, 2, 4096), (torch.float32, torch.float32, 8, 2, 4096),
                  (torch.bfloat16, torch.float32, 64, 4, 4096), (torch.float32, torch.float32, 64, 2, 4096),
                  (torch.bfloat16, torch.bfloat16, 64, 8, 4096))


def _adapter_variants(shapes=ADAPTER_SHAPES):
    import triton

    from . import adapter as K

    f32, i64 = torch.float32, torch.int64

    for dt, wdt, R, E, D in shapes:
        G = 2
        EP, RX = triton.next_power_of_2(E), K.slots(R)
        split = wdt == f32 and dt != f32
        planes = 2 if split else 1
        yield K._pack_w_kernel, dict(U=Ptr(wdt), C=Ptr(wdt), WP=Ptr(dt), D=D, DG=D // G, R=R, RG=R // G, E=E,
                                     EP=EP, RX=RX, SPLIT_W=split, BLOCK_D=64 if EP * RX <= 64 else 16), 4

        def opts(kernel, planes):
            cfg = K.fit(K.launch_config(dt, kernel), EP * RX, planes, dt.itemsize, kernel)
            return dict(BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d), {"num_warps": cfg.num_warps,
                                                                     "num_stages": cfg.num_stages}

        for drop in (False, True):
            shared = dict(M=32768, S=512, D=D, DG=D // G, scale=1.0, p_drop=0.1, keep_scale=1.0 / 0.9,
                          R=R, RX=RX, RG=R // G, E=E, EP=EP, HAS_DROPOUT=drop, PRECISION=K._dot_precision(dt))
            seed = Ptr(i64) if drop else None
            tiles, o = opts("fwd", planes)
            yield K._mma_fwd_kernel, dict(
                X=Ptr(dt), stride_x=D, A=Ptr(wdt), AB=Ptr(wdt), WP=Ptr(dt), MIX=Ptr(f32),
                SEED=seed, Y=Ptr(dt), Z=Ptr(f32), SPLIT_W=split, SOFT_RNE=False, **shared, **tiles), o
            tiles, o = opts("rows", planes)
            yield K._mma_bwd_rows_kernel, dict(
                DY=Ptr(dt), stride_dy=D, Z=Ptr(f32), WP=Ptr(dt), MIX=Ptr(f32), SEED=seed,
                DZ=Ptr(f32), DMIX=Ptr(f32), SPLIT_W=split, **shared, **tiles), o
            tiles, o = opts("cols", 1)
            # (frozen adapters, or an input that needs no gradient: one of the two, once)
            needs = ((True, True), (True, False), (False, True)) if (D, R, drop, wdt) == (4096, 8, False, f32) \
                else ((True, True),)
            for need_dx, need_dw in needs:
                part = Ptr(f32) if need_dw else None
                yield K._mma_bwd_cols_kernel, dict(
                    X=Ptr(dt), stride_x=D, DY=Ptr(dt), stride_dy=D, Z=Ptr(f32), DZ=Ptr(f32), A=Ptr(wdt),
                    MIX=Ptr(f32), SEED=seed, DX=Ptr(dt) if need_dx else None, DA_PART=part, DU_PART=part,
                    DC_PART=part, NEED_DX=need_dx, NEED_DW=need_dw, SOFT_RNE=False, **shared, **tiles), o
    yield K._keep_mask_kernel, dict(SEED=Ptr(i64), OUT=Ptr(torch.int8), M=32768, p_drop=0.1, R=8,
                                    RP=K.hidden_pad(8), BLOCK_M=64), 4


def _swiglu_variants():
    from . import swiglu as K

    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for n in (11008, 1000, 64, 16):  # one row a program, and 2, 32 and 128 rows stacked
            rows, block, warps = K.launch(n)
            yield K._swiglu_fwd_kernel, dict(G=Ptr(dt), U=Ptr(dt), H=Ptr(dt), M=4096, n=n, stride_g=2 * n,
                                             stride_u=2 * n, stride_h=n, ROWS=rows, BLOCK=block, SOFT_RNE=False), warps
            yield K._swiglu_bwd_kernel, dict(DH=Ptr(dt), G=Ptr(dt), U=Ptr(dt), DG=Ptr(dt), DU=Ptr(dt), M=4096, n=n,
                                             stride_dh=n, stride_g=2 * n, stride_u=2 * n, stride_dg=n, stride_du=n,
                                             ROWS=rows, BLOCK=block, SOFT_RNE=False), warps
    from . import quick_gelu as Q

    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for n in (4096, 1000, 64, 16):
            rows, block, warps = K.launch(n)
            yield Q._quick_gelu_fwd_kernel, dict(X=Ptr(dt), Y=Ptr(dt), M=4096, n=n, stride_x=n, stride_y=n,
                                                 ROWS=rows, BLOCK=block, SOFT_RNE=False, ALPHA_=Q.ALPHA), warps
            yield Q._quick_gelu_bwd_kernel, dict(DY=Ptr(dt), X=Ptr(dt), DX=Ptr(dt), M=4096, n=n, stride_dy=n,
                                                 stride_x=n, stride_dx=n, ROWS=rows, BLOCK=block, SOFT_RNE=False,
                                                 ALPHA_=Q.ALPHA), warps


def variants():
    """(kernel, args, num_warps or compile options) for every specialization checked."""
    yield from _norm_variants()
    yield from _common_variants()
    yield from _adapter_variants()
    yield from _swiglu_variants()


def _cuobjdump() -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def resource_usage(cubin: bytes) -> dict[str, int]:
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmfast.kernels.compile_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--no-spills", action="store_true", help="fail when any kernel uses local memory (spills)")
    args = p.parse_args(argv)
    from ._device import COMPILE_OPTIONS, interpreting

    if interpreting.__wrapped__():  # (the variable now, by Triton's rule: its compiler is what runs here)
        print("compile_check: unset TRITON_INTERPRET (it needs the compiler, not the interpreter)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures, spills, rows = [], [], []
    start = time.time()
    for fn, kargs, options in variants():
        options = {**COMPILE_OPTIONS, **(options if isinstance(options, dict) else {"num_warps": options})}
        warps = options["num_warps"]
        label = fn.__name__ + "(" + ", ".join(f"{p.name}={kargs[p.name]}" for p in fn.params
                                              if p.is_constexpr and kargs[p.name] is not None)
        label += f", warps={warps})" + ("" if aligned(fn, kargs) else " [rows off 16 B]")
        try:
            sig, consts, attrs = specialize(fn, kargs, options, target)
            compiled = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=target,
                                      options=options)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failures.append((label, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:400]}"))
            continue
        narrow = narrow_accesses(compiled.asm["ptx"]) if vectorizable(fn, kargs, warps) else 0
        if narrow:
            failures.append((label, f"{narrow} global loads/stores of single 8- or 16-bit elements where every "
                                    f"pointer and width is 16-byte aligned: the accesses are not vectorized"))
        use = resource_usage(compiled.asm["cubin"])
        use["SMEM"] = int(getattr(compiled.metadata, "shared", 0) or 0)  # dynamic: what pipelining takes
        rows.append((fn.__name__, warps, use))
        if use["SMEM"] > SMEM_LIMIT.get(args.arch, SMEM_LIMIT[90]):
            failures.append((label, f"needs {use['SMEM']} bytes of shared memory, more than sm_{args.arch} "
                                    f"gives a block ({SMEM_LIMIT.get(args.arch, SMEM_LIMIT[90])})"))
        if use.get("LOCAL", 0) or use.get("STACK", 0):
            spills.append((label, use))
    worst: dict[str, tuple] = {}
    for name, warps, use in rows:
        if name not in worst or use.get("REG", 0) > worst[name][1].get("REG", 0):
            worst[name] = (warps, use)
    print(f"compiled {len(rows)} specializations for sm_{args.arch} in {time.time() - start:.0f} s "
          f"(triton {triton.__version__})")
    for name, (warps, use) in worst.items():
        print(f"  {name:<28} max regs {use.get('REG', '?'):>4} (warps {warps})  stack {use.get('STACK', '?')}  "
              f"local {use.get('LOCAL', '?')}  shared {use.get('SMEM', '?')}")
    for label, use in spills:
        print(f"SPILLS: {label}: {use}")
    for label, err in failures:
        print(f"FAILED: {label}\n    {err}")
    return 1 if failures or (args.no_spills and spills) else 0


if __name__ == "__main__":
    sys.exit(main())
