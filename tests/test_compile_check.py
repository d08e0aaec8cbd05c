"""Every Triton kernel compiles for sm_90 with the real compiler (no GPU needed), in the block sizes
and warps the launchers use. The CPU tests run the kernels through the interpreter, which accepts code
the compiler rejects; this catches that. Spills are reported in the output, not failed."""

import ast
import os
import subprocess
import sys


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "mmfast.kernels.compile_check", "--arch", "90"],
                         env=env, capture_output=True, text=True, timeout=1200)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAILED" not in out.stdout
    for kernel in ("_norm_fwd_kernel", "_norm_bwd_kernel", "_norm_fwd_wide_kernel", "_norm_bwd_wide_kernel",
                   "_mma_fwd_kernel", "_mma_bwd_rows_kernel", "_mma_bwd_cols_kernel", "_swiglu_fwd_kernel",
                   "_swiglu_bwd_kernel"):
        assert kernel in out.stdout
    # the adapter's tiles, wide hidden x many experts included, fit the registers (adapter.fit): at most the
    # 8-16 B of stack ptxas leaves where it stops at 128 registers (Triton 3.6), where 928 B spilled before
    for line in out.stdout.splitlines():
        if line.startswith("SPILLS: _mma_"):
            use = ast.literal_eval(line[line.rindex(": {") + 2:])
            assert use["STACK"] <= 16 and use["LOCAL"] == 0, line


def test_variants_cover_every_kernel_and_launch_choice():
    """What is compiled covers what the launchers launch: every Triton kernel of mmfast.kernels, every boolean
    specialization both ways, every (PREFETCH, KEEP_W) loop shape tune_norm.py can enter, each dtype, and the
    extremes of the elementwise kernels' rows per program with every warp count their launcher picks."""
    import itertools
    from collections import defaultdict

    import torch

    from mmfast.kernels import compile_check as cc
    from mmfast.kernels import swiglu
    from spy import KERNEL_MODULES, triton_kernels

    seen = defaultdict(set)
    for fn, args, options in cc.variants():
        warps = options["num_warps"] if isinstance(options, dict) else options
        seen[fn.__name__, "num_warps"].add(warps)
        for k, v in args.items():
            seen[fn.__name__, k].add(v.dtype if isinstance(v, cc.Ptr) else v)
        if fn.__name__ == "_norm_bwd_kernel":
            seen[fn.__name__, "loop"].add((args["PREFETCH"], args["KEEP_W"]))
    kernels = {name for name, _ in seen}
    defined = triton_kernels()
    assert {mod.__name__ for mod, _, _ in defined} == {f"mmfast.kernels.{m}" for m in KERNEL_MODULES}
    assert {name for _, name, _ in defined} <= kernels, {name for _, name, _ in defined} - kernels
    # SOFT_RNE is the interpreter's rounding: never launched on a GPU
    fixed = {"SOFT_RNE"}
    for (name, key), values in seen.items():
        if key not in fixed and all(isinstance(v, bool) for v in values):
            assert values == {False, True}, (name, key, values)
    assert seen["_norm_bwd_kernel", "loop"] == set(itertools.product((False, True), repeat=2))
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    for name in ("_norm_fwd_kernel", "_norm_bwd_kernel", "_norm_fwd_wide_kernel", "_norm_bwd_wide_kernel"):
        assert {bf16, f32} <= seen[name, "X"] and {bf16, f32} <= seen[name, "W"], name
    for name in ("_swiglu_fwd_kernel", "_quick_gelu_fwd_kernel"):
        first = "G" if "swiglu" in name else "X"
        assert seen[name, first] == {bf16, f16, f32}, name
        picks = {swiglu.launch(n) for n in range(1, 4 * swiglu.MAX_BLOCK)}
        assert {1, max(r for r, _, _ in picks)} <= seen[name, "ROWS"], name
        assert {w for _, _, w in picks} <= seen[name, "num_warps"], name


_FAKE_COMPILE = r'''
import contextlib, io, json, sys, types
import triton
from mmfast.kernels import compile_check as cc

expected = [o["num_warps"] if isinstance(o, dict) else o for _, _, o in cc.variants()]
aligned = [[fn.__name__, cc.vectorizable(fn, a, o["num_warps"] if isinstance(o, dict) else o)]
           for fn, a, o in cc.variants()]
for scenario in json.loads(sys.argv[1]):
    calls = []

    def compile(src, target=None, options=None):
        name = src.fn.__name__
        calls.append([name, target.backend, target.arch, target.warp_size, options["num_warps"],
                      options.get("enable_fp_fusion")])
        if name == scenario.get("fail"):
            raise RuntimeError("at 12:8:\nunsupported layout conversion")
        shared = scenario.get("smem", 0) if name == "_swiglu_fwd_kernel" else 0
        ptx = scenario.get("ptx", {}).get(name, "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];")
        calls[-1].append(bool(src.attrs))
        return types.SimpleNamespace(asm={"cubin": name.encode(), "ptx": ptx},
                                     metadata=types.SimpleNamespace(shared=shared))

    triton.compile = compile
    cc.resource_usage = lambda cubin: dict(scenario.get("use", {}) if cubin == b"_swiglu_bwd_kernel" else
                                           {"REG": 40, "STACK": 0, "SHARED": 0, "LOCAL": 0})
    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = cc.main(scenario.get("argv", []))
    print("RESULT " + json.dumps({"rc": rc, "calls": calls, "expected_warps": expected, "aligned": aligned,
                                  "out": out.getvalue()}))
'''


def _fake_compile_check(*scenarios):
    """compile_check.main() once per scenario, in a process without the interpreter, with triton.compile
    (and cuobjdump) stood in for: each run's exit status, the compiles it asked for, and its output."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _FAKE_COMPILE, json.dumps(scenarios)], env=env,
                         capture_output=True, text=True, timeout=300)
    results = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(scenarios), out.stdout + out.stderr
    return results


def test_compile_check_main_with_a_stand_in_compiler():
    """main() with triton.compile stood in for: no --arch compiles every variant for ("cuda", 90, 32) with the
    launcher's warps and the JIT's alignment marks; a compile error, shared memory past what sm_90 gives a block
    (232448 B: that much is allowed), a 16-bit global load in a variant whose rows are all 16-byte aligned (not
    in one whose are not), a stack frame or local memory (spills: reported, failing only with --no-spills)
    each show."""
    stack = {"REG": 255, "STACK": 24, "SHARED": 0, "LOCAL": 0}
    local = {"REG": 255, "STACK": 0, "SHARED": 0, "LOCAL": 8}
    narrow = "ld.global.L1::evict_last.b16 {%rs1}, [%rd2];\n"
    plain, failed, smem_max, smem_over, scalar, *spills = _fake_compile_check(
        {}, {"fail": "_keep_mask_kernel"}, {"smem": 232448}, {"smem": 232449},
        {"ptx": {"_norm_fwd_kernel": narrow, "_swiglu_fwd_kernel": narrow, "_quick_gelu_bwd_kernel": narrow}},
        {"use": stack}, {"use": local},
        {"use": stack, "argv": ["--no-spills"]}, {"use": local, "argv": ["--no-spills"]})
    assert plain["rc"] == 0, plain["out"]
    assert {tuple(c[1:4]) for c in plain["calls"]} == {("cuda", 90, 32)}
    assert [c[4] for c in plain["calls"]] == plain["expected_warps"]
    assert {c[5] for c in plain["calls"]} == {True}  # (as the launchers ask)
    assert {c[6] for c in plain["calls"]} == {True}  # (every variant has an aligned pointer)
    assert scalar["rc"] == 1
    failed_scalar = [line.split("(")[0] for line in scalar["out"].splitlines() if line.startswith("FAILED")]
    # the norm kernel's aligned variants fail, and no unaligned one (N=1000, a view one element in) does
    assert set(failed_scalar) == {"FAILED: _norm_fwd_kernel", "FAILED: _swiglu_fwd_kernel",
                                  "FAILED: _quick_gelu_bwd_kernel"}, scalar["out"]
    fwd = [ok for name, ok in scalar["aligned"] if name == "_norm_fwd_kernel"]
    assert failed_scalar.count("FAILED: _norm_fwd_kernel") == sum(fwd) < len(fwd)
    assert "not vectorized" in scalar["out"] and "rows off 16 B" not in scalar["out"]
    assert "SPILLS" not in plain["out"] and "FAILED" not in plain["out"]
    assert failed["rc"] == 1 and "FAILED: _keep_mask_kernel(" in failed["out"]
    assert "unsupported layout conversion" in failed["out"]
    assert smem_max["rc"] == 0, smem_max["out"]
    assert smem_over["rc"] == 1 and "FAILED: _swiglu_fwd_kernel(" in smem_over["out"]
    assert "shared memory" in smem_over["out"]
    for run in spills[:2]:
        assert run["rc"] == 0 and "SPILLS: _swiglu_bwd_kernel(" in run["out"], run["out"]
    assert [run["rc"] for run in spills[2:]] == [1, 1]


def test_resource_usage_reads_cuobjdump(tmp_path, monkeypatch):
    """The registers, stack, shared and local memory of cuobjdump --dump-resource-usage (triton's copy)."""
    from mmfast.kernels import compile_check as cc

    tool = tmp_path / "cuobjdump"
    tool.write_text("#!/bin/sh\nprintf 'Resource usage:\\n Common:\\n  GLOBAL:0\\n Function _k:\\n"
                    "  REG:168 STACK:24 SHARED:1024 LOCAL:16 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0\\n'\n")
    tool.chmod(0o755)
    monkeypatch.setattr(cc, "_cuobjdump", lambda: str(tool))
    assert cc.resource_usage(b"\0") == {"REG": 168, "STACK": 24, "SHARED": 1024, "LOCAL": 16}


_REAL_SPECIALIZE = r'''
import json, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mmfast.kernels import compile_check as cc, norm as K

target, out = GPUTarget("cuda", 90, 32), {}
fn, args, warps = cc._norm_fwd(K, True, torch.bfloat16, torch.float32, 4096)
options = {"num_warps": warps, "enable_fp_fusion": True}
for name, change in (("aligned", {}), ("odd", {"N": 1000, "stride_x": 1000, "stride_r": 1000}),
                     ("view", {"X": cc.Ptr(torch.bfloat16, aligned=False), "stride_x": 4097}), ("one", {"M": 1})):
    sig, consts, attrs = cc.specialize(fn, {**args, **change}, options, target)
    out[name] = {"marked": sorted(fn.arg_names[i] for (i,) in attrs),
                 "consts": {fn.arg_names[i]: v for (i,), v in consts.items() if v is not None and not
                            fn.params[i].is_constexpr}, "types": {k: sig[k] for k in ("X", "N", "eps", "M")}}
    assert all(v == [["tt.divisibility", 16]] for v in attrs.values())
sig, consts, attrs = cc.specialize(fn, args, options, target)
for name, marks in (("narrow_aligned", attrs), ("narrow_unmarked", {})):
    compiled = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=marks), target=target, options=options)
    out[name] = cc.narrow_accesses(compiled.asm["ptx"])
print("RESULT " + json.dumps(out))
'''


def test_variants_are_compiled_as_the_jit_specializes_them():
    """What is compiled is what a launch with those arguments runs: Triton's JIT marks a 16-byte aligned pointer
    and an int that divides by 16 (and makes an int of 1 a constant); without the marks the real compiler reads
    a bf16 row one element at a time (16-bit loads), with them in 16-byte vectors, and narrow_accesses tells the
    two apart in the PTX."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _REAL_SPECIALIZE], env=env, capture_output=True, text=True,
                         timeout=600)
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")] or [run.stdout + run.stderr]
    out = json.loads(line[len("RESULT "):])
    pointers = ["RSTD", "W", "X", "Y"]
    strides = ["stride_r", "stride_x"]  # (stride_r is an int argument also when there is no residual)
    assert out["aligned"] == {"marked": sorted(pointers + ["M", "N"] + strides), "consts": {},
                              "types": {"X": "*bf16", "N": "i32", "eps": "fp32", "M": "i32"}}
    assert out["odd"]["marked"] == sorted(pointers + ["M"])
    assert out["view"]["marked"] == sorted(["M", "N", "RSTD", "W", "Y", "stride_r"])
    assert out["one"]["marked"] == sorted(pointers + ["N"] + strides)
    assert out["one"]["consts"] == {"M": 1} and out["one"]["types"]["M"] == "constexpr"
    assert out["narrow_aligned"] == 0 and out["narrow_unmarked"] >= 16, out


def test_narrow_accesses_counts_single_element_global_accesses():
    from mmfast.kernels.compile_check import narrow_accesses

    ptx = """
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.L1::evict_last.b16 { %rs1 }, [ %rd2 + 0 ];
    @%p1 st.global.b16 [ %rd3 + 0 ], { %rs2 };
    st.global.u8 [ %rd4 ], %rs3;
    ld.global.b32 { %r5 }, [ %rd5 + 0 ];
    ld.global.v2.b32 { %r6, %r7 }, [ %rd6 + 0 ];
    ld.shared.b16 %rs4, [ %r8 ];
    st.global.v4.b16 [ %rd7 ], { %rs5, %rs6, %rs7, %rs8 };
    """
    assert narrow_accesses(ptx) == 3  # (the evict_last load, the predicated b16 store, the u8 store)
