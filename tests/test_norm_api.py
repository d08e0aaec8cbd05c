"""The op layer around the norm kernels: bad input, backend choice, opcheck, torch.compile."""

import os
import subprocess
import sys

import pytest
import torch

import mmfast
from mmfast.ops import norm as ops_norm
from mmfast.ops.backend import EAGER_ENV, ENV_VAR, resolve_backend
from dispatch import dispatched_ops
from norm_cases import check_case, make_case

# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, before anything launches
# ---------------------------------------------------------------------------------------------


def _call(kind, x, w=None, b=None, eps=1e-5, residual=None):
    if kind == "rms":
        return mmfast.rms_norm(x, w, eps, residual=residual)
    return mmfast.layer_norm(x, w, b, eps, residual=residual)


def _torch_norm(kind, x, w=None, b=None, eps=1e-5):
    """PyTorch's own norm of the last dimension: what ``_call`` is held to."""
    import torch.nn.functional as F

    if kind == "rms":
        return F.rms_norm(x, x.shape[-1:], w, eps)
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if any backend runs: errors must come before a launch."""

    def boom(*a, **k):
        raise AssertionError("a backend ran before the bad input was rejected")

    monkeypatch.setattr(ops_norm, "_impl", boom)


BAD = {
    "weight-length": (ValueError, "weight", lambda d: dict(x=torch.randn(2, 8, device=d), w=torch.ones(7, device=d))),
    "weight-2d": (ValueError, "weight", lambda d: dict(x=torch.randn(2, 8, device=d), w=torch.ones(1, 8, device=d))),
    "bias-length": (ValueError, "bias", lambda d: dict(x=torch.randn(2, 8, device=d), w=torch.ones(8, device=d), b=torch.ones(9, device=d))),
    "int-x": (TypeError, "x", lambda d: dict(x=torch.ones(2, 8, dtype=torch.int32, device=d))),
    "complex-x": (TypeError, "x", lambda d: dict(x=torch.ones(2, 8, dtype=torch.complex64, device=d))),
    "float64-x": (TypeError, "x", lambda d: dict(x=torch.ones(2, 8, dtype=torch.float64, device=d))),
    "int-weight": (TypeError, "weight", lambda d: dict(x=torch.randn(2, 8, device=d), w=torch.ones(8, dtype=torch.int64, device=d))),
    "complex-weight": (TypeError, "weight", lambda d: dict(x=torch.randn(2, 8, device=d), w=torch.ones(8, dtype=torch.complex64, device=d))),
    "fp16-weight-bf16-x": (TypeError, "weight", lambda d: dict(x=torch.randn(2, 8, device=d).bfloat16(), w=torch.ones(8, dtype=torch.float16, device=d))),
    "weight-other-device": (ValueError, "weight", lambda d: dict(x=torch.randn(2, 8, device=d), w=torch.ones(8, device="meta"))),
    "bias-other-device": (ValueError, "bias", lambda d: dict(x=torch.randn(2, 8, device=d), w=torch.ones(8, device=d), b=torch.ones(8, device="meta"))),
    "residual-other-device": (ValueError, "residual", lambda d: dict(x=torch.randn(2, 8, device=d), residual=torch.ones(2, 8, device="meta"))),
    "residual-shape": (ValueError, "residual", lambda d: dict(x=torch.randn(2, 8, device=d), residual=torch.ones(1, 8, device=d))),
    "residual-dtype": (TypeError, "residual", lambda d: dict(x=torch.randn(2, 8, device=d), residual=torch.ones(2, 8, device=d).half())),
    "N-too-large": (ValueError, "65536", lambda d: dict(x=torch.zeros(1, ops_norm.MAX_N + 1, device=d))),
    "N-zero": (ValueError, "empty", lambda d: dict(x=torch.zeros(3, 0, device=d))),
    "scalar-x": (ValueError, "dimension", lambda d: dict(x=torch.tensor(1.0, device=d))),
    "negative-eps": (ValueError, "eps", lambda d: dict(x=torch.randn(2, 8, device=d), eps=-1.0)),
    "nan-eps": (ValueError, "eps", lambda d: dict(x=torch.randn(2, 8, device=d), eps=float("nan"))),
    "tensor-eps": (TypeError, "eps", lambda d: dict(x=torch.randn(2, 8, device=d), eps=torch.tensor(1e-5))),
    "x-not-tensor": (TypeError, "x", lambda d: dict(x=[[1.0, 2.0]])),
}


@pytest.mark.parametrize(
    "kind,case", [("ln", c) for c in BAD] + [("rms", c) for c in BAD if not c.startswith("bias")]
)
def test_bad_input(kind, case, device, no_launch):
    exc, word, make = BAD[case]
    kwargs = make(device)
    with pytest.raises(exc, match=word):
        _call(kind, **kwargs)


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_numpy_eps(kind, device):
    """A NumPy scalar eps (a config read through NumPy): np.float32 was refused as "not a Python float" while
    np.float64, a float subclass, passed; both give the float's result."""
    import numpy as np

    x = torch.randn(3, 8, device=device)
    expected = _call(kind, x=x, eps=1e-3)
    for eps in (np.float32(1e-3), np.float64(1e-3)):
        torch.testing.assert_close(_call(kind, x=x, eps=eps), expected)


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_only_the_residual_sum_used(kind, path, device, monkeypatch):
    """Only ``residual_out`` reaches the loss (the normalised output unused): the norm's parameters get no
    gradient (None, as PyTorch gives them; they got zeros, which weight decay and momentum still move) and
    x and the residual get the sum's."""
    if path == "ops":
        monkeypatch.setenv("MMFAST_EAGER", "ops")
    x, r = (torch.randn(3, 8, device=device, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(8, device=device, requires_grad=True) for _ in range(2))
    _, h = _call(kind, x=x, w=w, b=b if kind == "ln" else None, residual=r)
    g = torch.randn_like(h)
    h.backward(g)
    assert w.grad is None and b.grad is None
    torch.testing.assert_close(x.grad, g, rtol=0, atol=0)
    torch.testing.assert_close(r.grad, g, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_inference_tensor_inputs_train_the_weights(kind, residual, path, device, monkeypatch):
    """Features made under ``torch.inference_mode`` (a frozen encoder's cached output) into a norm whose weight
    trains: HF's RMSNorm trains on them (it saves only tensors it computed), but the fused ops saved x, and
    autograd refuses to save an inference tensor. A copy is saved in that case: the gradients are those of
    the same values in an ordinary tensor, bit for bit."""
    if path == "ops":
        monkeypatch.setenv(EAGER_ENV, "ops")
    with torch.inference_mode():
        x = torch.randn(3, 8, device=device)
        r = torch.randn(3, 8, device=device) if residual else None
    grads = []
    for inference in (True, False):
        xs, rs = (x, r) if inference else (x.clone(), None if r is None else r.clone())
        w, b = (torch.linspace(0.5, 1.5, 8, device=device).requires_grad_() for _ in range(2))
        out = _call(kind, x=xs, w=w, b=b if kind == "ln" else None, residual=rs)
        y = out[0] if residual else out
        y.backward(torch.linspace(-1, 1, y.numel(), device=device).view_as(y))
        grads.append((y.detach(), w.grad, b.grad))
    for got, want in zip(*grads):
        assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_under_autocast_runs_as_pytorchs(residual, device, monkeypatch):
    """CUDA autocast runs PyTorch's layer_norm in float32 (a float32-list op: the inputs cast, the output
    float32). The fused op kept x's dtype, so a patched CLIP tower under autocast (HF Trainer's bf16=True on a
    bf16 model) ran its residual stream in bf16 where the unpatched one runs it in fp32 (pre_layrnorm's
    output is the stream), and a bf16 weight with fp32 x was refused. CPU autocast leaves layer_norm in the
    input's dtype, and so does the fused op there; on CPU the test gives CPU's autocast CUDA's rule
    (AUTOCAST_FP32_LAYER_NORM) and compares with what CUDA autocast runs: layer_norm of float32 casts."""
    import torch.nn.functional as F

    if device == "cpu":
        with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU's own rule first: the input's dtype
            x = torch.randn(3, 8, dtype=torch.bfloat16)
            assert mmfast.layer_norm(x, None, None).dtype == F.layer_norm(x, (8,)).dtype == torch.bfloat16
        monkeypatch.setattr(ops_norm, "AUTOCAST_FP32_LAYER_NORM", ("cpu",))
    for xdt, wdt, rdt in ((torch.bfloat16, torch.bfloat16, None), (torch.bfloat16, torch.float32, None),
                          (torch.float32, torch.bfloat16, None), (torch.float16, torch.float16, None),
                          (torch.bfloat16, torch.float32, torch.float32)):  # (a bf16 branch into an fp32 stream)
        x = torch.randn(4, 6, 32, device=device).to(xdt).requires_grad_()
        r = torch.randn(4, 6, 32, device=device).to(rdt or xdt).requires_grad_() if residual else None
        w = (1 + torch.randn(32, device=device) / 4).to(wdt).requires_grad_()
        b = torch.randn(32, device=device).to(wdt).requires_grad_()
        leaves = [t for t in (x, r, w, b) if t is not None]
        with torch.autocast(device, dtype=torch.bfloat16):
            out = mmfast.layer_norm(x, w, b, 1e-5, residual=r)
        y, h = out if residual else (out, None)
        hw = x if r is None else (x + r).detach().requires_grad_()
        want = F.layer_norm(hw.float(), (32,), w.float(), b.float(), 1e-5)
        assert y.dtype == torch.float32 and (h is None or (h.dtype == hw.dtype and torch.equal(h, hw)))
        torch.testing.assert_close(y, want)
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, leaves, dy)
        ref = torch.autograd.grad(want, [hw, w, b], dy)
        ref = [ref[0]] * (2 if residual else 1) + list(ref[1:])
        for g, t, e in zip(got, leaves, ref):  # (both fp32 sums rounded once to the leaf's dtype)
            assert g.dtype == t.dtype
            torch.testing.assert_close(g, e.to(g.dtype))
    # the patched module too: nn.LayerNorm's output dtype under autocast
    norm = torch.nn.LayerNorm(32, device=device, dtype=torch.bfloat16)
    mmfast.patch(torch.nn.Sequential(norm), verbose=False)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert norm(torch.randn(2, 32, device=device, dtype=torch.bfloat16)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------------


def test_backend_env(monkeypatch, device):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_backend(torch.device(device)) == "reference"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend(torch.device(device))
    monkeypatch.setenv(ENV_VAR, "auto")
    assert resolve_backend(torch.device(device)) == "triton"  # CUDA, or CPU under the interpreter


def test_eager_env(monkeypatch, device):
    """MMFAST_EAGER takes 'ops' and 'eager' in any case; 'OPS' or '1' were ignored without a word (the fast
    path ran), where a bad MMFAST_BACKEND raises. Another value raises now, naming the variable."""
    from mmfast.ops.backend import plain_eager

    x = torch.randn(2, 8, device=device)
    for value, fast in (("", True), ("eager", True), ("Eager", True), ("ops", False), (" OPS ", False)):
        monkeypatch.setenv(EAGER_ENV, value)
        assert plain_eager(x) is fast, value
    for value in ("1", "true", "op"):
        monkeypatch.setenv(EAGER_ENV, value)
        with pytest.raises(ValueError, match=f"{EAGER_ENV}='{value}'"):
            mmfast.rms_norm(x, None)


def test_use_backend_block(monkeypatch, device):
    """use_backend wins over the variable, nests, rejects unknown names, and covers a backward run
    inside the block."""
    from mmfast.ops import backend as be

    dev = torch.device(device)
    monkeypatch.setenv(ENV_VAR, "triton")
    with mmfast.use_backend("reference"):
        assert resolve_backend(dev) == "reference"
        with mmfast.use_backend("auto"):
            assert resolve_backend(dev) == "triton"
        assert resolve_backend(dev) == "reference"
    assert resolve_backend(dev) == "triton"
    with pytest.raises(ValueError, match="use_backend"), mmfast.use_backend("bogus"):
        pass

    seen = []
    real = be.resolve_backend
    monkeypatch.setattr(ops_norm, "resolve_backend", lambda d, key=None: seen.append((key.direction, real(d, key))) or seen[-1][1])
    x = torch.randn(4, 64, device=device, requires_grad=True)
    with mmfast.use_backend("reference"):
        mmfast.rms_norm(x, torch.ones(64, device=device)).sum().backward()
    assert seen == [("fwd", "reference"), ("bwd", "reference")]


def test_residual_calls_are_their_own_kernel_class(monkeypatch, device):
    """The backend choice sees the residual variant (forward: a residual; backward: its gradient), so a
    backend table entry timed without a residual does not decide for it."""
    seen = []
    real = ops_norm.resolve_backend
    monkeypatch.setattr(ops_norm, "resolve_backend", lambda d, key=None: seen.append(key) or real(d, key))
    x = torch.randn(4, 64, device=device, requires_grad=True)
    r = torch.randn(4, 64, device=device, requires_grad=True)
    y, h = mmfast.rms_norm(x, torch.ones(64, device=device), residual=r)
    torch.autograd.grad((y, h), (x, r), (torch.randn_like(y), torch.randn_like(h)))
    mmfast.rms_norm(x, torch.ones(64, device=device)).sum().backward()
    assert [(k.direction, k.residual) for k in seen] == [("fwd", True), ("bwd", True), ("fwd", False), ("bwd", False)]


def test_use_backend_blocks_overlapping_on_threads(monkeypatch):
    """Blocks entered and left out of order on two threads: the choice is the process's (autograd runs
    backward on threads of its own), that of the latest block still open; when both have closed the
    variable rules again (a saved-and-restored global left the first thread's choice on for the rest of
    the process)."""
    import threading

    from mmfast.ops.backend import requested_backend

    monkeypatch.setenv(ENV_VAR, "auto")
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with mmfast.use_backend("reference"):
            a_in.set()
            b_in.wait()
        a_out.set()

    def thread_b():
        a_in.wait()
        with mmfast.use_backend("triton"):
            b_in.set()
            a_out.wait()
            seen["b after a left"] = requested_backend()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert seen == {"b after a left": "triton"}
    assert requested_backend() == "auto"


def test_backends_used_counts_what_ran(monkeypatch, device):
    """``backends_used`` counts each op call, forward and backward (the backward runs on autograd's
    thread), by the backend that ran it; blocks nest; a block that is closed counts nothing more."""
    from mmfast.ops.backend import BackendUse
    from tiny_models import batch, build

    model = build("llama").to(device)
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    layers = len(model.model.layers)
    inputs = {k: v.to(device) for k, v in batch("llama").items()}
    dt, n_embd = torch.float32, model.config.hidden_size
    n_ffn = model.config.intermediate_size
    monkeypatch.setenv(ENV_VAR, "auto")
    with mmfast.backends_used() as outer:
        with mmfast.backends_used() as inner:
            model(**inputs).loss.backward()
        with mmfast.use_backend("reference"):
            model(**inputs).loss.backward()
    model(**inputs).loss.backward()
    # per step: two norms per layer plus the final norm, one SwiGLU per layer, each forward and backward
    step = {("rms_norm", n_embd, 2 * layers + 1), ("swiglu", n_ffn, layers)}
    expected = {BackendUse(op, d, "triton", dt, n): k for op, n, k in step for d in ("fwd", "bwd")}
    assert dict(inner) == expected
    assert dict(outer) == {**expected, **{u._replace(backend="reference"): k for u, k in expected.items()}}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_backends_used_counts_an_adapter_call_once(dropout, device):
    """One adapter forward and its backward count one each, with dropout too (the dropout bookkeeping, which
    asks again which backend ran the forward, counted it a second time in each direction)."""
    from mmfast.nn.adapter import MMAdapter
    from mmfast.ops.backend import BackendUse

    adapter = MMAdapter(32, dropout=dropout).to(device).train()
    x, route = torch.randn(2, 5, 32, device=device), torch.randn(2, 32, device=device)
    with mmfast.backends_used() as used:
        adapter(x, route).sum().backward()
    backend = "triton" if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    assert dict(used) == {BackendUse("mma_adapter", d, backend, torch.float32, 32): 1 for d in ("fwd", "bwd")}


def test_interpreter_without_triton_is_an_error(monkeypatch):
    """TRITON_INTERPRET=1 asks for the Triton kernels on CPU: without Triton installed that is an error that
    says so (the reference ran silently, so a broken install looked like a tested kernel)."""
    from mmfast.kernels import _device
    from mmfast.ops import backend

    monkeypatch.setattr(_device, "interpreting", lambda: True)
    monkeypatch.setattr(backend, "_triton_available", lambda: False)
    monkeypatch.setenv(ENV_VAR, "auto")
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        backend.resolve_backend(torch.device("cpu"))
    monkeypatch.setenv(ENV_VAR, "reference")
    assert backend.resolve_backend(torch.device("cpu")) == "reference"


def test_forced_triton_under_the_interpreter_refuses_tensors_of_other_devices(monkeypatch):
    """The Triton interpreter runs CPU tensors: MMFAST_BACKEND=triton with TRITON_INTERPRET=1 and tensors of
    another (non-CUDA) device is an error that says so, not a launch of the interpreter on them."""
    from mmfast.kernels import _device
    from mmfast.ops import backend

    monkeypatch.setattr(_device, "interpreting", lambda: True)
    monkeypatch.setattr(_device, "interpreter_problem", lambda: None)
    monkeypatch.setattr(backend, "_triton_available", lambda: True)
    monkeypatch.setenv(ENV_VAR, "triton")
    assert backend.resolve_backend(torch.device("cpu")) == "triton"
    for dev in ("mps", "xpu"):
        with pytest.raises(RuntimeError, match=f"interpreter runs CPU tensors, not {dev}"):
            backend.resolve_backend(torch.device(dev))


def _interpreting_with(monkeypatch, value):
    """_device.interpreting() as a fresh process with TRITON_INTERPRET=value would answer, and Triton's answer."""
    import triton

    from mmfast.kernels import _device

    with monkeypatch.context() as m:
        m.setenv("TRITON_INTERPRET", value)
        _device.interpreting.cache_clear()
        try:
            return _device.interpreting(), triton.knobs.runtime.interpret
        finally:
            _device.interpreting.cache_clear()


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "on", "yes", "y", "0", "false", "off", "", "no", "n", "2"])
def test_interpreting_agrees_with_triton(monkeypatch, value):
    """mmfast and Triton read TRITON_INTERPRET alike: were mmfast to miss TRITON_INTERPRET=true, the interpreter
    would run the kernels while mmfast took the reference path for CPU tensors and GPU rounding for them."""
    ours, triton_says = _interpreting_with(monkeypatch, value)
    assert ours == triton_says, value


def test_interpreting_is_read_once(monkeypatch):
    """Triton fixes interpreter mode when it decorates the kernels; a later change of the variable changes
    neither its answer nor mmfast's."""
    from mmfast.kernels import _device

    first = _device.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0" if first else "1")
    assert _device.interpreting() == first


def test_sm_count_of_cuda_devices(monkeypatch):
    """Off the interpreter: an index-less CUDA device is the current one (cuda:1 current: its SMs, not
    cuda:0's); an indexed one is itself."""
    from mmfast.kernels import _device

    monkeypatch.setattr(_device, "interpreting", lambda: False)
    monkeypatch.setattr(_device, "_cuda_sm_count", lambda index: {0: 132, 1: 78}[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _device.sm_count(torch.device("cuda")) == 78
    assert _device.sm_count(torch.device("cuda", 0)) == 132


def test_cpu_without_interpreter_uses_reference():
    """A fresh process with the interpreter off: CPU tensors take the reference, and forcing Triton
    is an error that says why (Triton fixes interpreter mode when it is imported, hence a subprocess)."""
    code = (
        "import torch, mmfast\n"
        "from mmfast.ops.backend import resolve_backend\n"
        "assert resolve_backend(torch.device('cpu')) == 'reference'\n"
        "y = mmfast.rms_norm(torch.randn(2, 8), torch.ones(8))\n"
        "import os; os.environ['MMFAST_BACKEND'] = 'triton'\n"
        "try:\n"
        "    mmfast.rms_norm(torch.randn(2, 8), torch.ones(8))\n"
        "except RuntimeError as e:\n"
        "    assert 'CUDA tensors' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV_VAR)}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_interpreter_version_problem_is_an_error(monkeypatch):
    """Triton 3.6's interpreter with numpy >= 2.4 fails inside every indexing kernel; mmfast says so
    before launching (auto and forced triton alike), not with the interpreter's TypeError."""
    from mmfast.kernels import _device

    assert _device.version_problem("3.6.0", "2.4.6") is not None
    assert _device.version_problem("3.6.0+git1a2b", "2.4.0rc1") is not None
    for ok in (("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.9.0", "2.4.6"), ("4.0.0", "3.0.0")):
        assert _device.version_problem(*ok) is None, ok
    if torch.cuda.is_available():
        return
    monkeypatch.setattr(_device, "interpreter_problem", lambda: "Triton 3.6.0's interpreter fails")
    x = torch.randn(2, 8)
    for forced in ("auto", "triton"):
        monkeypatch.setenv(ENV_VAR, forced)
        with pytest.raises(RuntimeError, match="Triton 3.6.0's interpreter fails"):
            mmfast.rms_norm(x, torch.ones(8))
    monkeypatch.setenv(ENV_VAR, "reference")
    mmfast.rms_norm(x, torch.ones(8))


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_reference_backend_accuracy(kind, monkeypatch, device, seed):
    """The reference backend (explicit backward formulas) obeys the same accuracy rule."""
    monkeypatch.setenv(ENV_VAR, "reference")
    check_case(make_case(kind, (3, 7), 1000, "bf16-fp32w", residual=True, device=device), seed)
    check_case(make_case(kind, (3, 7), 129, "fp32", residual=False, device=device), seed)


def test_backends_agree(monkeypatch, device):
    x = torch.randn(6, 300, device=device)
    w = torch.randn(300, device=device)
    monkeypatch.setenv(ENV_VAR, "reference")
    ref = mmfast.rms_norm(x, w)
    monkeypatch.setenv(ENV_VAR, "triton")
    torch.testing.assert_close(mmfast.rms_norm(x, w), ref)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------


def _opcheck_args(device):
    x = torch.randn(3, 5, 64, device=device, requires_grad=True)
    r = torch.randn(3, 5, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    return x, r, w, b


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend, monkeypatch, device):
    monkeypatch.setenv(ENV_VAR, backend)
    x, r, w, b = _opcheck_args(device)
    ops = torch.ops.mmfast
    torch.library.opcheck(ops.rms_norm_fwd, (x, w, r, 1e-6))
    torch.library.opcheck(ops.rms_norm_fwd, (x, None, None, 1e-6))
    torch.library.opcheck(ops.layer_norm_fwd, (x, w, b, r, 1e-5))
    torch.library.opcheck(ops.layer_norm_fwd, (x, None, None, None, 1e-5))
    with torch.no_grad():
        y, h, rstd = ops.rms_norm_fwd(x, w, r, 1e-6)
        _, _, mean, lrstd = ops.layer_norm_fwd(x, w, b, r, 1e-5)
    dy = torch.randn_like(y)
    w, b = w.detach(), b.detach()  # the backward ops are not themselves differentiated
    torch.library.opcheck(ops.rms_norm_bwd, (dy, h, w, rstd, dy, True, True))
    torch.library.opcheck(ops.rms_norm_bwd, (dy, h, None, rstd, None, True, False))
    torch.library.opcheck(ops.layer_norm_bwd, (dy, h, w, b, mean, lrstd, dy, True, True, True))
    torch.library.opcheck(ops.layer_norm_bwd, (dy, h, w, b, mean, lrstd, None, False, True, False))


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_compile_fullgraph(kind, device):
    """torch.compile traces the ops with no graph break; forward and backward match eager."""
    torch._dynamo.reset()
    x, r, w, b = _opcheck_args(device)

    def f(x, r, w, b):
        if kind == "rms":
            y, h = mmfast.rms_norm(x * 2, w, 1e-6, residual=r)
        else:
            y, h = mmfast.layer_norm(x * 2, w, b, 1e-5, residual=r)
        return (y.float().square().sum() + h.sum()) / 7

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=False)
    leaves = (x, r, w, b)
    eager_grads = torch.autograd.grad(f(*leaves), leaves, allow_unused=True)
    loss = compiled(*leaves)
    torch.testing.assert_close(loss, f(*leaves))
    for g_c, g_e in zip(torch.autograd.grad(loss, leaves, allow_unused=True), eager_grads):
        if g_e is None:
            assert g_c is None
        else:
            torch.testing.assert_close(g_c, g_e)


def test_compile_dynamic_shapes(device):
    torch._dynamo.reset()
    w = torch.randn(64, device=device)
    f = torch.compile(lambda x: mmfast.rms_norm(x, w), backend="aot_eager", fullgraph=True, dynamic=True)
    for M in (3, 5, 11):
        x = torch.randn(M, 64, device=device)
        torch.testing.assert_close(f(x), mmfast.rms_norm(x, w))


def test_interpreter_set_by_conftest():
    """The CPU test run exercises the Triton kernels, not the reference."""
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# eager fast path (autograd.Function) vs the custom ops
# ---------------------------------------------------------------------------------------------


def _run_both_paths(kind, monkeypatch, device, residual, wdtype):
    """Outputs and gradients of one call through each path, on the same inputs."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 300, device=device, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True) if residual else None
    w = torch.randn(300, device=device, dtype=wdtype, requires_grad=True)
    b = torch.randn(300, device=device, dtype=wdtype, requires_grad=True) if kind == "ln" else None
    gy, gh = torch.randn_like(x), torch.randn_like(x)
    leaves = [t for t in (x, r, w, b) if t is not None]
    results = {}
    for path in ("fast", "ops"):
        monkeypatch.setenv(EAGER_ENV, "ops" if path == "ops" else "")
        out = mmfast.rms_norm(x, w, residual=r) if kind == "rms" else mmfast.layer_norm(x, w, b, residual=r)
        y, h = out if residual else (out, None)
        assert (y.grad_fn.name() == ("_RMSNormFnBackward" if kind == "rms" else "_LayerNormFnBackward")) == (path == "fast")
        outs, seeds = ([y, h], [gy, gh]) if residual else ([y], [gy])
        results[path] = [y, h] + list(torch.autograd.grad(outs, leaves, seeds))
    return results


@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("residual", [False, True])
def test_eager_fast_path_equals_custom_ops(kind, residual, monkeypatch, device):
    """Both paths run the same kernels: outputs and every gradient are bitwise equal."""
    res = _run_both_paths(kind, monkeypatch, device, residual, torch.float32)
    for a, b in zip(res["fast"], res["ops"]):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["rms", "ln", "swiglu"])
def test_no_autograd_node_when_nothing_records(kind, monkeypatch, device):
    """Under no_grad, or with no input requiring grad (a frozen tower), the eager path runs the forward
    kernel alone: the same output, no autograd node, nothing saved."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 300, device=device, dtype=torch.bfloat16)
    w = torch.randn(300, device=device)
    b = torch.randn(300, device=device)
    r = torch.randn_like(x)
    calls = {"rms": lambda x: mmfast.rms_norm(x, w, residual=r), "ln": lambda x: mmfast.layer_norm(x, w, b, residual=r),
             "swiglu": lambda x: (mmfast.swiglu(x, r), x)}
    want = calls[kind](x.detach().requires_grad_())  # the recorded path
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        frozen = calls[kind](x)
        with torch.no_grad():
            nograd = calls[kind](x.detach().requires_grad_())
    assert not saved
    for got in (frozen, nograd):
        for a, e in zip(got, want):
            assert a.grad_fn is None and torch.equal(a, e.detach())


def test_fast_path_only_in_plain_eager(device):
    """Modes, subclasses and tracing see the custom op (so they can intercept it)."""
    x = torch.randn(4, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device)
    assert mmfast.rms_norm(x, w).grad_fn.name() == "_RMSNormFnBackward"

    seen = dispatched_ops(lambda: mmfast.rms_norm(x, w))
    assert any("mmfast.rms_norm_fwd" in s for s in seen), seen
    class Passthrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert mmfast.layer_norm(x, w, None).grad_fn.name() != "_LayerNormFnBackward"


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("grad", [False, True])
def test_outputs_are_tensors_of_their_own(op, grad):
    """A 3-D input's outputs were views of the row-shaped results: a norm module sharded by FSDP2 then warned,
    on every forward, that an in-place op on its output would drop the pre-backward hook (the PyTorch
    norms return tensors of their own). Every output is a tensor of its own now, with the same values."""
    x = torch.randn(2, 3, 64, requires_grad=grad)
    w, r = torch.randn(64), torch.randn(2, 3, 64)
    args = (x, w) if op == "rms_norm" else (x, w, torch.randn(64))
    fn = getattr(mmfast, op)
    for out in (fn(*args), *fn(*args, residual=r)):
        assert out._base is None and out.shape == x.shape
    y, h = fn(*args, residual=r)
    ref_y, ref_h = getattr(ops_norm, f"{op}_reference")(*args, residual=r)  # (values: test_norm.py)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(h, ref_h, rtol=0, atol=0)
    if grad:
        y.sum().backward()
        assert x.grad is not None and x.grad._base is None


@pytest.mark.parametrize("P,N,chunk", [(1056, 1024, 32), (257, 300, 96), (100, 40, 64), (97, 33, 200), (5, 7, 2)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_partial_sums_split_over_rows(P, N, chunk, out_dtype, device):
    """The dweight / dbias partials ([P, N] fp32, P several per SM) were summed by N / 256 programs, 4 at
    N = 1024, each reading a quarter of the rows at the latency of its loads. The rows are split into chunks
    too where the columns leave SMs idle (a first pass writes each chunk's sum into its first row, a second adds
    those): as accurate as PyTorch's sum, and the same bits run to run."""
    from accuracy import assert_accurate

    from mmfast.kernels._common import sum_partials

    torch.manual_seed(P * N)
    part = torch.randn(P, N, device=device) * torch.rand(1, N, device=device) * 4  # (the launcher's tensors' device)
    ref = part.double().sum(0)
    outs = []
    for _ in range(2):
        out = torch.empty(N, dtype=out_dtype, device=device)
        sum_partials(part.clone(), out, chunk)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert_accurate("sum", outs[0], part.sum(0).to(out_dtype), ref, part.abs().sum(0).max().item(), P * N, terms=P)


def test_partial_sums_split_rows_where_columns_leave_sms_idle():
    from mmfast.kernels._common import SUM_BLOCK_P, sum_block_n, sum_chunk_rows

    h100 = 132
    for P, N in ((1056, 1024), (2112, 768), (1056, 4096), (528, 5120), (1056, 65536)):
        chunk = sum_chunk_rows(P, N, h100)
        programs = -(-N // sum_block_n(N)) * -(-P // chunk)
        # a split into whole steps, two programs per SM (or as many chunks as there are steps of rows)
        assert chunk % SUM_BLOCK_P == 0 and chunk < P and (programs >= 2 * h100 or chunk == SUM_BLOCK_P), (P, N)
    # a few rows (small M: one pass, no second launch), or columns enough to fill the GPU: one pass
    assert sum_chunk_rows(128, 1024, h100) == 128 and sum_chunk_rows(4096, 1 << 17, h100) == 4096


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_default_eps_is_the_pytorch_modules(kind, device):
    """Without eps, rms_norm uses HF LlamaRMSNorm's default (1e-6) and layer_norm nn.LayerNorm's (1e-5): on
    rows whose variance is about 1e-6, where the two differ by a factor of two and more."""
    x = torch.randn(4, 64, device=device) * 1e-3
    w = torch.randn(64, device=device)
    want, other = (1e-6, 1e-5) if kind == "rms" else (1e-5, 1e-6)
    got = mmfast.rms_norm(x, w) if kind == "rms" else mmfast.layer_norm(x, w, None)  # (not _call: its eps is set)
    assert torch.equal(got, _call(kind, x, w, eps=want))
    assert not torch.allclose(got, _call(kind, x, w, eps=other), rtol=0.1)


# (the interpreter warns of the padding rows of a tile: variance 0, so 1 / sqrt(0), never stored)
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_zero_eps(kind, device):
    """eps = 0 is a valid eps (nn.LayerNorm and torch's rms_norm take it): the result is PyTorch's."""
    x = torch.randn(4, 64, device=device)
    w, b = torch.randn(64, device=device), torch.randn(64, device=device)
    for eps in (0, 0.0):
        b_ = b if kind == "ln" else None
        torch.testing.assert_close(_call(kind, x, w, b_, eps=eps), _torch_norm(kind, x, w, b_, 0.0))


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_only_the_residual_requires_grad(kind, path, device, monkeypatch):
    """x and the norm's parameters frozen, only the residual stream trains: it gets the gradient (the call
    records for it, though none of x, weight, bias requires grad)."""
    if path == "ops":
        monkeypatch.setenv(EAGER_ENV, "ops")
    x, w, b = torch.randn(3, 64, device=device), torch.randn(64, device=device), torch.randn(64, device=device)
    r = torch.randn(3, 64, device=device, requires_grad=True)
    gy, gh = torch.randn(3, 64, device=device), torch.randn(3, 64, device=device)
    y, h = _call(kind, x, w, b if kind == "ln" else None, residual=r)
    (got,) = torch.autograd.grad([y, h], [r], [gy, gh])
    r2 = r.detach().requires_grad_()
    h2 = x + r2
    y2 = _torch_norm(kind, h2, w, b if kind == "ln" else None)
    (want,) = torch.autograd.grad([y2, h2], [r2], [gy, gh])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("kind,trains", [("rms", "weight"), ("rms", "x"), ("ln", "weight"), ("ln", "bias"), ("ln", "x")])
def test_frozen_parameters_get_no_gradient_work(kind, trains, path, device, monkeypatch):
    """Only what requires grad gets a gradient, and the backward is asked for nothing else (a frozen norm
    weight in LoRA / BitFit-style tuning costs no dweight reduction): a trained bias beside a frozen weight
    gets its gradient, PyTorch's."""
    if path == "ops":
        monkeypatch.setenv(EAGER_ENV, "ops")
    asked = []
    real_impl = ops_norm._impl

    def recording_impl(*args, **kwargs):
        fwd, bwd = real_impl(*args, **kwargs)

        def recorded_bwd(*a, **k):
            asked.append(a[7:10])  # (need_dx, need_dw, need_db)
            return bwd(*a, **k)

        return fwd, recorded_bwd

    monkeypatch.setattr(ops_norm, "_impl", recording_impl)
    x = torch.randn(3, 64, device=device, requires_grad=trains == "x")
    w = torch.randn(64, device=device, requires_grad=trains == "weight")
    b = torch.randn(64, device=device, requires_grad=trains == "bias") if kind == "ln" else None
    gy = torch.randn(3, 64, device=device)
    leaves = [t for t in (x, w, b) if t is not None]
    y = _call(kind, x, w, b)
    y.backward(gy)
    assert asked == [(trains == "x", trains == "weight", trains == "bias")]
    copies = [t.detach().requires_grad_(t.requires_grad) for t in leaves]
    y2 = _torch_norm(kind, *copies)
    y2.backward(gy)
    for got, want in zip(leaves, copies):
        assert (got.grad is None) == (want.grad is None)
        if want.grad is not None:
            torch.testing.assert_close(got.grad, want.grad)
