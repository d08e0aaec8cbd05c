"""The fused LM-head loss (``mmfast.ops.loss.linear_cross_entropy``) against the float64 reference of the
unfused computation (accuracy rule: accuracy.py). PyTorch's own low-precision result is the unfused
computation in the inputs' dtype: ``F.linear``, upcast to fp32, ``F.cross_entropy`` (HF's causal-LM loss).

Natural scales come from the float64 logits' gradient G: the hidden gradient of a row is sum_v G W_v
(scale max (|G| |W|)), the weight's is sum_t G h_t over the kept rows (scale max (|G|^T |h|), one term per
row), the bias's sum_t G (scale max sum_t |G|).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from accuracy import assert_accurate
from mmfast.ops.loss import _apply, linear_cross_entropy, linear_cross_entropy_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100


def make(device, dtype, lead=(3, 37), H=48, V=301, bias=True, ignored=0.3, w_grad=True):
    h = torch.randn(*lead, H, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=device) / math.sqrt(H)).to(dtype).requires_grad_(w_grad)
    b = (0.5 * torch.randn(V, device=device)).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, lead, device=device)
    t[torch.rand(lead, device=device) < ignored] = IGNORE
    return h, w, b, t


def grads(loss, leaves):
    live = [x for x in leaves if x is not None and x.requires_grad]
    gs = iter(torch.autograd.grad(loss, live))
    return [next(gs) if x is not None and x.requires_grad else None for x in leaves]


def check(name_fn, ours_fn, h, w, b, t, seed, **kw):
    """Loss and every gradient of ``ours_fn`` against the float64 reference, PyTorch's error the baseline."""
    leaves = (h, w, b)
    loss = ours_fn(h, w, t, b, **kw)
    g = grads(loss, leaves)
    lowp = linear_cross_entropy_reference(h, w, t, b, **kw)
    g_lp = grads(lowp, leaves)
    l64 = [None if x is None else x.detach().double().requires_grad_(x.requires_grad) for x in leaves]
    logits = F.linear(l64[0], l64[1], l64[2])
    ref = _reference_from_logits(logits, t, **kw)
    rows = int((t != IGNORE).sum())
    assert loss.dtype == torch.float32 and loss.shape == ()
    if not math.isfinite(ref.item()):  # no labelled row and a mean: NaN, as PyTorch
        assert math.isnan(loss.item()) and math.isnan(lowp.item())
        return
    assert_accurate(f"{name_fn} loss", loss, lowp, ref, abs(ref.item()) + 1.0, seed, terms=max(rows, 1))
    G = torch.autograd.grad(ref, logits, retain_graph=True)[0].abs().reshape(-1, w.shape[0])
    g_ref = grads(ref, l64)
    habs, wabs = l64[0].detach().abs().reshape(-1, w.shape[1]), l64[1].detach().abs()
    scales = {"hidden": (G @ wabs).max().item(), "weight": (G.t() @ habs).max().item(),
              "bias": G.sum(0).max().item()}
    for name, x, ours, lp, r in zip(scales, leaves, g, g_lp, g_ref):
        if x is None or not x.requires_grad:
            assert ours is None
            continue
        assert ours.dtype == x.dtype and ours.shape == x.shape, name
        # d hidden sums over the vocabulary, d weight and d bias over the kept rows
        assert_accurate(f"{name_fn} d{name}", ours, lp, r, scales[name], seed,
                        terms=w.shape[0] if name == "hidden" else max(rows, 1))


def _reference_from_logits(logits, t, ignore_index=IGNORE, reduction="mean", num_items_in_batch=None):
    flat = logits.reshape(-1, logits.shape[-1])
    if num_items_in_batch is not None:
        return F.cross_entropy(flat, t.reshape(-1), ignore_index=ignore_index, reduction="sum") / num_items_in_batch
    return F.cross_entropy(flat, t.reshape(-1), ignore_index=ignore_index, reduction=reduction)


def forced(mode, chunk_rows):
    def fn(h, w, t, b, **kw):
        scale = 1.0 / kw["num_items_in_batch"] if "num_items_in_batch" in kw else None
        return _apply(h, w, b, t, IGNORE, scale, chunk_rows, mode, h.dtype)
    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["logits", "accumulate"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(device, seed, dtype, mode, bias):
    """Several chunks with a remainder (chunk 7 over ~78 kept rows), odd vocabulary, both ways of
    keeping the weight's gradient."""
    h, w, b, t = make(device, dtype, bias=bias)
    check(f"{mode}/{dtype}", forced(mode, 7), h, w, b, t, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_entry_default_chunking(device, seed, dtype):
    h, w, b, t = make(device, dtype, lead=(2, 50), H=64, V=1000)
    check("default", linear_cross_entropy, h, w, b, t, seed)


@pytest.mark.parametrize("kw", [dict(reduction="sum"), dict(num_items_in_batch=57),
                                dict(num_items_in_batch="tensor")], ids=["sum", "items-int", "items-tensor"])
def test_reductions(device, seed, kw):
    if kw.get("num_items_in_batch") == "tensor":
        kw = dict(num_items_in_batch=torch.tensor(57, device=device))
    h, w, b, t = make(device, torch.bfloat16)
    check(str(kw), linear_cross_entropy, h, w, b, t, seed, **kw)


@pytest.mark.parametrize("path", ["eager", "ops"])
def test_another_ignore_index(device, seed, path, monkeypatch):
    """``ignore_index`` other than -100 (HF's loss takes it as a keyword): the rows whose target is that
    value are left out, on both paths; here a token id (5), so -100 is not in the batch at all."""
    monkeypatch.setenv("MMFAST_EAGER", path)
    h, w, b, t = make(device, torch.float32)
    t = torch.where(t == IGNORE, 5, t)
    assert (t == 5).sum() > 0
    check(f"ignore_index=5/{path}", linear_cross_entropy, h, w, b, t, seed, ignore_index=5)
    check(f"ignore_index=5/{path}/sum", linear_cross_entropy, h, w, b, t, seed, ignore_index=5, reduction="sum")


def test_default_chunks_hold_at_most_chunk_bytes_of_logits(device, seed, monkeypatch):
    """The default row chunk keeps one chunk's fp32 logits within ``CHUNK_BYTES`` (lowered here to 128 rows
    of the vocabulary; 256 rows kept): the vocabulary-wide tensors the function both paths run makes, seen
    by a dispatch mode, have at most that many rows. Values by the accuracy rule."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from mmfast.ops import loss as loss_ops

    V = 301
    monkeypatch.setattr(loss_ops, "CHUNK_BYTES", 4 * V * 128)
    h, w, b, t = make(device, torch.float32, lead=(4, 64), H=16, V=V, ignored=0.0, w_grad=False)
    rows = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            rows.extend(o.shape[0] for o in tree_leaves(out)
                        if isinstance(o, torch.Tensor) and o.dim() == 2 and o.shape[1] == V and not func.is_view)
            return out

    with Watch():
        loss_ops._loss_and_grads(h.detach(), w.detach(), b.detach(), t, IGNORE, None, None, True, False, True,
                                 "auto", torch.float32)
    assert rows and max(rows) == 128, sorted(set(rows))
    check("default chunks", linear_cross_entropy, h, w, b, t, seed)


def test_frozen_weight_keeps_only_the_hidden_gradient(device, seed):
    """LN tuning freezes the LM head in layernorm-simp / mma: only d hidden, nothing vocab-sized kept."""
    h, w, b, t = make(device, torch.bfloat16, w_grad=False, bias=False, lead=(4, 64), H=32, V=512)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        linear_cross_entropy(h, w, t)
    assert all(x.shape[-1] != w.shape[0] for x in saved), [tuple(x.shape) for x in saved]
    check("frozen", linear_cross_entropy, h, w, None, t, seed)


def test_keeps_less_than_the_unfused_logits(device):
    """What autograd keeps for backward: under the unfused computation's fp32 logits of every row."""
    h, w, b, t = make(device, torch.bfloat16, lead=(4, 128), H=64, V=2048, bias=False, ignored=0.5)

    def saved_bytes(fn):
        seen = {}

        def pack(x):
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn(h, w, t)
        params = {w.untyped_storage().data_ptr(), h.untyped_storage().data_ptr()}
        return sum(n for p, n in seen.items() if p not in params)

    fused, unfused = saved_bytes(linear_cross_entropy), saved_bytes(linear_cross_entropy_reference)
    assert unfused >= 4 * 512 * 2048  # fp32 logits (log-softmax output) of all 512 rows
    assert fused <= 2 * (256 + 64) * 2048 * 0.6  # ~256 kept rows: their logits' gradient + hidden, bf16


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_labelled_rows(device, seed, reduction):
    h, w, b, t = make(device, torch.float32, ignored=1.1)
    check(f"empty/{reduction}", linear_cross_entropy, h, w, b, t, seed, reduction=reduction)
    if reduction == "sum":
        loss = linear_cross_entropy(h, w, t, b, reduction="sum")
        gh, gw, gb = torch.autograd.grad(loss, (h, w, b))
        assert loss.item() == 0 and not gh.any() and not gw.any() and not gb.any()
    # HF's normaliser counted 0 items (every label of the accumulated batch ignored), as a number or a
    # tensor: sum / 0 as PyTorch's (NaN here, inf with a labelled row), not Python's ZeroDivisionError
    for count in (0, torch.tensor(0, device=device)):
        for tt in (t, torch.where(torch.arange(t.numel(), device=device).view(t.shape) == 0, 1, t)):
            ours = linear_cross_entropy(h, w, tt, b, num_items_in_batch=count)
            want = linear_cross_entropy_reference(h, w, tt, b, num_items_in_batch=count)
            assert torch.equal(ours.isnan(), want.isnan()) and (ours.isnan() or ours == want)


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_labelled_rows_gives_pytorchs_gradients(device, dtype, path, monkeypatch):
    """Every target ignored, a mean (NaN loss) or HF's normaliser at 0 items: the gradients are PyTorch's,
    zero, in every dtype. (fp16 lifts the logits' gradient by about 1 / scale; a NaN or infinite scale must
    not reach the weight's accumulator, which it scales back: NaN times its zeros.)"""
    monkeypatch.setenv("MMFAST_EAGER", path)
    h, w, b, t = make(device, dtype, ignored=1.1)
    for kw in ({}, {"num_items_in_batch": 0}):
        ours = grads(linear_cross_entropy(h, w, t, b, **kw), (h, w, b))
        want = grads(linear_cross_entropy_reference(h, w, t, b, **kw), (h, w, b))
        assert all(torch.equal(x, y) for x, y in zip(ours, want)), (kw, [x.abs().max() for x in ours])


@pytest.mark.parametrize("ignored", [0.3, 0.0], ids=["some-ignored", "all-kept"])
def test_autocast(device, seed, ignored):
    """fp32 model under bf16 autocast (HF Trainer's bf16=True): bf16 products, fp32 gradients. With every
    row kept the rows are not gathered, but they still need the cast to the autocast dtype."""
    h, w, b, t = make(device, torch.float32, ignored=ignored)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, b)
        lowp = linear_cross_entropy_reference(h, w, t, b)
    g, g_lp = grads(loss, (h, w, b)), grads(lowp, (h, w, b))
    hb, wb, bb = (x.detach().to(torch.bfloat16).double().requires_grad_() for x in (h, w, b))
    ref = linear_cross_entropy_reference(hb, wb, t, bb)
    g_ref = grads(ref, (hb, wb, bb))
    assert_accurate("autocast loss", loss, lowp, ref, abs(ref.item()) + 1.0, seed, terms=t.numel())
    for name, ours, lp, r in zip(("hidden", "weight", "bias"), g, g_lp, g_ref):
        assert ours.dtype == torch.float32
        # both round their products to bf16; compare with the bf16 unit at the gradient's scale
        assert_accurate(f"autocast d{name}", ours.to(torch.bfloat16), lp.to(torch.bfloat16), r,
                        r.abs().max().item(), seed, terms=t.numel())


def test_float64_under_autocast_stays_float64(device, seed):
    """Autocast leaves float64 operands alone, so the fused loss of float64 inputs inside an autocast
    region is the float64 loss (it ran in the autocast dtype: a bf16-sized error)."""
    h, w, b, t = make(device, torch.float32)
    h, w, b = (x.detach().double().requires_grad_() for x in (h, w, b))
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, b)
        want = linear_cross_entropy_reference(h, w, t, b)
    # both take the softmax in fp32 (the upcast of the logits); a few fp32 units at the gradient's scale
    # apart, where the autocast dtype's rounding is thousands of them
    unit = 64 * torch.finfo(torch.float32).eps
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want.float(), rtol=unit, atol=0)
    for ours, ref in zip(grads(loss, (h, w, b)), grads(want, (h, w, b))):
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, ref, rtol=0, atol=unit * ref.abs().max().item())


def test_non_contiguous_and_deterministic(device, seed):
    """A non-contiguous hidden gives bitwise the contiguous copy's loss and gradients (PyTorch's own CPU
    matmul does not: its strided bf16 path rounds differently), and those meet the accuracy rule."""
    h, w, b, t = make(device, torch.bfloat16, lead=(37, 3))
    hv = h.detach().transpose(0, 1).requires_grad_()  # [3, 37, H] view, not contiguous
    tv = t.t()
    hc = hv.detach().contiguous().requires_grad_()
    assert not hv.is_contiguous()
    check("contiguous copy", linear_cross_entropy, hc, w, b, tv, seed)
    runs = [(linear_cross_entropy(x, w, tv, b), x) for x in (hv, hv, hc)]
    results = [(loss, *grads(loss, (x, w, b))) for loss, x in runs]
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(results[0], other))


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("mode", ["logits", "accumulate"])
def test_backward_scales_by_the_incoming_gradient(device, seed, path, mode, monkeypatch):
    """The gradients of 4 * loss are 4 times those of loss, bit for bit (a power of two: every rounding
    commutes with it), on the eager path and the custom op's, and a second derivative raises on both."""
    monkeypatch.setenv("MMFAST_EAGER", path)
    h, w, b, t = make(device, torch.bfloat16)
    fn = forced(mode, 7)
    once = grads(fn(h, w, t, b), (h, w, b))
    scaled = grads(4 * fn(h, w, t, b), (h, w, b))
    assert all(torch.equal(4 * x, y) and x.abs().max() > 0 for x, y in zip(once, scaled))
    gh = torch.autograd.grad(fn(h, w, t, b), h, create_graph=True)[0]
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gh.float().square().sum(), w)


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("mode", ["logits", "accumulate"])
def test_incoming_gradient_multiplies_in_fp32(device, seed, path, mode, monkeypatch):
    """GradScaler's first loss scale, 2**16, is inf in fp16: every gradient times it must stay finite (the
    hidden's, kept in fp16, 2**16 times the loss's own bit for bit), and a factor like 1/3 multiplies
    unrounded (in bf16 it would be 0.33398): the kept hidden gradient times the fp32 factor, rounded once."""
    monkeypatch.setenv("MMFAST_EAGER", path)
    fn = forced(mode, 7)
    h, w, b, t = make(device, torch.float16)
    once = grads(fn(h, w, t, b), (h, w, b))
    scaled = grads(2.0**16 * fn(h, w, t, b), (h, w, b))
    assert all(torch.isfinite(y).all() for y in scaled)
    # (fp16 keeps the hidden gradient in fp32, so 2**16 times it rounds once: one unit of the loss's own)
    torch.testing.assert_close(scaled[0].float() / 2.0**16, once[0].float(), rtol=2.0**-10, atol=2.0**-24)
    h, w, b, t = make(device, torch.bfloat16)
    once = grads(fn(h, w, t, b), (h, w, b))
    third = grads(fn(h, w, t, b) / 3, (h, w, b))
    go = (torch.ones((), device=device) / 3).item()  # the fp32 incoming gradient
    assert torch.equal((once[0].float() * go).bfloat16(), third[0])


@pytest.mark.parametrize("shape", [(0, 8), (5, 7), (3, 4, 6)], ids=str)
def test_incoming_gradient_in_blocks(shape, device, monkeypatch):
    """A 16-bit kept gradient is widened a block at a time (not two fp32 copies of a whole LM head's
    gradient at once): blocks that split rows give the one-shot fp32 product's bits, empty ones included."""
    from mmfast.ops import loss as loss_ops

    go = torch.ones((), device=device) / 3
    for block in (5, loss_ops._SCALE_BLOCK):
        monkeypatch.setattr(loss_ops, "_SCALE_BLOCK", block)
        for dtype in DTYPES:
            g = torch.randn(shape, device=device).to(dtype)
            assert torch.equal(loss_ops._scaled(g, go, dtype), (g.float() * go).to(dtype))


@pytest.mark.parametrize("path", ["eager", "ops"])
def test_meta_tensors_give_shapes(path, monkeypatch):
    """On the meta device (shapes only: a model traced before its weights load) the op asked autocast about
    the meta device, which raised; the unpatched loss gives a meta loss."""
    monkeypatch.setenv("MMFAST_EAGER", path)
    h, w, b, t = (x.detach().to("meta") if x.is_floating_point() else x.to("meta")
                  for x in make("cpu", torch.bfloat16))
    h.requires_grad_(), w.requires_grad_()
    loss = linear_cross_entropy(h, w, t, b)
    assert loss.is_meta and loss.shape == () and loss.dtype == torch.float32
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert gh.is_meta and gh.shape == h.shape and gw.is_meta and gw.shape == w.shape


def test_auto_mode_keeps_the_smaller(device):
    """The weight's gradient is kept as the logits' gradient with the kept rows ([n, V + H] in the activation
    dtype) or as an fp32 [V, H] accumulator, whichever is smaller: the choice compared the logits' gradient
    alone, and kept up to 67 MB more at LLaVA-7B's head (n from 7264 to 8192 rows, bf16)."""
    from mmfast.ops.loss import _loss_and_grads

    H, V = 48, 301  # fp32 [V, H]: 57,792 bytes; bf16 [n, V + H]: 698 n bytes
    for n, mode in ((82, "logits"), (83, "accumulate"), (96, "accumulate")):
        h, w, _, _ = make(device, torch.bfloat16, lead=(n,), H=H, V=V, bias=False)
        t = torch.randint(0, V, (n,), device=device)
        with torch.no_grad():  # (as the autograd Function's forward runs it)
            r = _loss_and_grads(h, w, None, t, IGNORE, None, None, True, True, False, "auto", torch.bfloat16)
        kept = [x for x in (r.g_logits, r.hv, r.g_w32) if x is not None]
        assert (mode == "logits") == (r.g_logits is not None) and (mode == "accumulate") == (r.g_w32 is not None), n
        assert sum(x.numel() * x.element_size() for x in kept) <= V * H * 4, n


@pytest.mark.parametrize("own", [False, True])
def test_incoming_gradient_into_another_dtype_in_blocks(own, device, monkeypatch):
    """An fp32 kept gradient (the weight's accumulator) for a 16-bit parameter, and a product the backward
    made for the purpose (``own``: scaled where it lies), give the one-shot product's bits block by block."""
    from mmfast.ops import loss as loss_ops

    go = torch.ones((), device=device) / 3
    monkeypatch.setattr(loss_ops, "_SCALE_BLOCK", 5)
    for src, dtype in ((torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
                       (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)):
        g = torch.randn(7, 3, device=device).to(src)
        want = (g.float() * go).to(dtype)
        out = loss_ops._scaled(g, go, dtype, own=own)
        assert torch.equal(out, want) and (out is g) == (own and src == dtype)


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("mode", ["logits", "accumulate"])
def test_the_weight_gradient_is_the_backwards_one_weight_sized_tensor(device, path, mode, monkeypatch):
    """The backward runs first, at the step's memory peak. The incoming gradient times the kept one is written
    a block at a time into the weight's gradient: accumulate mode made a whole fp32 [V, H] temporary of
    the product first, and logits mode a second [V, H] for the product of its product (about 525 MB at
    LLaVA-7B's LM head, bf16)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from mmfast.ops import loss as loss_ops

    monkeypatch.setenv("MMFAST_EAGER", path)
    monkeypatch.setattr(loss_ops, "_SCALE_BLOCK", 64)
    h, w, b, t = make(device, torch.bfloat16, bias=False)
    loss = forced(mode, 7)(h, w, t, b) / 3
    made = {}

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in tree_leaves(out):
                if isinstance(o, torch.Tensor) and o.numel() >= w.numel() and not func.is_view:
                    made.setdefault(o.untyped_storage().data_ptr(), []).append((str(func), o.shape, o.dtype))
            return out

    with Watch():
        g = torch.autograd.grad(loss, w)[0]
    assert list(made) == [g.untyped_storage().data_ptr()], made


@pytest.mark.parametrize("ignored", [0.5, 0.0], ids=["some-ignored", "all-kept"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_forward_copies_no_kept_rows_beside_the_hidden_gradient(device, seed, ignored, dtype):
    """With the LM head frozen (both recipes) the forward's only [n, H] tensor is the hidden gradient, at
    the step's activation peak: the kept rows are gathered a chunk at a time, and with every row kept
    in the compute dtype read in place. A whole copy of them was made first (16 GiB at a million bf16 tokens
    of H = 8192). Checked on the function both paths run, whose operations a dispatch mode sees."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from mmfast.ops import loss as loss_ops

    h, w, b, t = make(device, dtype, lead=(4, 64), H=32, V=512, bias=False, ignored=ignored, w_grad=False)
    n = int((t != IGNORE).sum())
    big = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in tree_leaves(out):
                # hidden-wide, more rows than a chunk's
                if isinstance(o, torch.Tensor) and o.shape[-1:] == h.shape[-1:] and o.numel() > 16 * h.shape[-1] \
                        and not func.is_view:
                    big.append((str(func), tuple(o.shape)))
            return out

    with Watch():
        r = loss_ops._loss_and_grads(h.detach(), w.detach(), None, t, IGNORE, None, 16, True, False, False, "auto",
                                     dtype)
    assert big == [("aten.new_empty.default", (n, h.shape[-1]))], big
    check("chunked", forced("auto", 16), h, w, None, t, seed)
    assert r.hv is None and r.g_h.shape == (n, h.shape[-1])


@pytest.mark.parametrize("path", ["eager", "ops"])
def test_fp16_hidden_gradient_keeps_its_precision_under_a_mean(device, seed, path, monkeypatch):
    """fp16 over many rows: the mean's 1/n puts the logits' gradient below fp16's normal range, where
    unfused training relies on a loss scaler (GradScaler) to lift it, and the scale reaches a fused loss
    only after its kept gradients were rounded. The hidden gradient is kept at a lifted scale instead.
    Norm-wise against float64 (model_accuracy.py's gradient rule), PyTorch's error being unfused fp16 under
    GradScaler's 2**16: within 2x it (at 32768 rows the subnormal rounding made it 35x)."""
    monkeypatch.setenv("MMFAST_EAGER", path)
    h, w, _, t = make(device, torch.float16, lead=(32768,), H=32, V=200, bias=False, ignored=0.0, w_grad=False)
    S = 2.0**16
    (ours,) = torch.autograd.grad(S * linear_cross_entropy(h, w, t), h)
    (lowp,) = torch.autograd.grad(S * linear_cross_entropy_reference(h, w, t), h)
    h64 = h.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(S * F.cross_entropy(F.linear(h64, w.detach().double()), t), h64)
    err, err_lowp = (ours.double() - ref).norm().item(), (lowp.double() - ref).norm().item()
    bound = 2 * err_lowp + torch.finfo(torch.float16).eps * ref.norm().item()
    assert err <= bound, f"||error|| {err:.3e} > 2 x PyTorch's {err_lowp:.3e} + eps ||ref|| (seed {seed})"


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("mode", ["logits", "accumulate"])
def test_fp16_weight_gradient_keeps_its_precision_under_a_mean(device, seed, path, mode, monkeypatch):
    """The trained LM head's gradient in fp16: the logits' gradient was rounded to fp16 at the mean's 1/n
    before any loss scale reached it (1e-2 relative error where PyTorch under GradScaler has 2e-4). It is
    summed from the lifted gradient in fp32 now; the bound is the hidden gradient's test's."""
    monkeypatch.setenv("MMFAST_EAGER", path)
    h, w, _, t = make(device, torch.float16, lead=(8192,), H=32, V=1000, bias=False, ignored=0.0)
    h = h.detach()
    S = 2.0**16
    (ours,) = torch.autograd.grad(S * forced(mode, 1000)(h, w, t, None), w)  # several chunks
    (lowp,) = torch.autograd.grad(S * linear_cross_entropy_reference(h, w, t), w)
    w64 = w.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(S * F.cross_entropy(F.linear(h.double(), w64), t), w64)
    err, err_lowp = (ours.double() - ref).norm().item(), (lowp.double() - ref).norm().item()
    bound = 2 * err_lowp + torch.finfo(torch.float16).eps * ref.norm().item()
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    assert err <= bound, f"||error|| {err:.3e} > 2 x PyTorch's {err_lowp:.3e} + eps ||ref|| (seed {seed})"


def test_target_dtypes_give_the_same_loss(device):
    """int32 and uint8 targets (F.cross_entropy takes uint8) give an int64 target's loss and gradients."""
    h, w, b, t = make(device, torch.float32)
    t = t.clamp(0, min(255, w.shape[0] - 1))  # uint8 cannot hold ignore_index -100
    h = h.detach().requires_grad_()
    loss = linear_cross_entropy(h, w, t, b)
    (grad,) = torch.autograd.grad(loss, h)
    for dtype in (torch.int32, torch.uint8):
        other = linear_cross_entropy(h, w, t.to(dtype), b)
        assert torch.equal(other, loss) and torch.equal(torch.autograd.grad(other, h)[0], grad), dtype


def test_bad_input(device):
    h, w, b, t = make(device, torch.float32)
    bad = t.clone()
    bad[0, 0] = w.shape[0]
    for path in ("eager", "ops"):  # an IndexError as F.cross_entropy's, and a ValueError as the checks'
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MMFAST_EAGER", path)
            for kind in (ValueError, IndexError):
                with pytest.raises(kind, match="target values"):
                    linear_cross_entropy(h, w, bad, b)
    with pytest.raises(ValueError, match="target shape"):
        linear_cross_entropy(h, w, t[:, :-1], b)
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        linear_cross_entropy(h, w[:, :-1], t, b)
    with pytest.raises(TypeError, match="dtype"):
        linear_cross_entropy(h, w.detach().double(), t, b)
    for dtype in (torch.float32, torch.int8, torch.int16):  # the message names what is taken
        with pytest.raises(TypeError, match="int64, int32 or uint8"):
            linear_cross_entropy(h, w, t.to(dtype), b)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, b, reduction="none")
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(h, w, t, b[:-1])
    # a bias F.linear refuses (an integer one, or another dtype outside autocast) was cast without a word
    with pytest.raises(TypeError, match="bias must be floating point"):
        linear_cross_entropy(h, w, t, torch.ones(w.shape[0], dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="bias is torch.bfloat16 but hidden and weight are torch.float32"):
        linear_cross_entropy(h, w, t, b.detach().bfloat16())
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):  # (cast there, as F.linear's: test_autocast)
        assert torch.isfinite(linear_cross_entropy(h, w.detach().bfloat16(), t, b.detach()))
    with pytest.raises(ValueError, match="bias is on meta but hidden is on"):
        linear_cross_entropy(h, w, t, b.detach().to("meta"))
    with pytest.raises(ValueError, match="weight is on meta but hidden is on"):
        linear_cross_entropy(h, w.detach().to("meta"), t, b)
    for path in ("eager", "ops"):  # both paths refuse it the same way
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MMFAST_EAGER", path)
            with pytest.raises(ValueError, match="chunk_rows"):
                linear_cross_entropy(h, w, t, b, chunk_rows=0)


# ---------------------------------------------------------------------------------------------
# the custom op: torch.compile, modes, subclasses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_custom_op_matches_reference(device, seed, dtype, bias, monkeypatch):
    """The op path (what compile traces): hidden gradient at full shape, weight's through the fp32
    accumulator, several chunks."""
    monkeypatch.setenv("MMFAST_EAGER", "ops")
    h, w, b, t = make(device, dtype, bias=bias)
    check(f"op/{dtype}", forced("auto", 7), h, w, b, t, seed)
    check(f"op/{dtype}/items", linear_cross_entropy, h, w, b, t, seed, num_items_in_batch=torch.tensor(41))


class _Wrapped(torch.Tensor):
    """The simplest tensor subclass: PyTorch's own ``__torch_function__``, which re-wraps every result."""


@pytest.mark.parametrize("which", ["hidden", "weight", "both"])
def test_a_torch_function_subclass(device, seed, which):
    """A ``__torch_function__`` subclass takes the custom op, whose loss PyTorch re-wraps (an alias node
    above the op's): marking that node for the second-derivative check raised ``AttributeError`` on every
    call with the subclass requiring grad. Values against float64; a second derivative still raises."""
    def wrapped(h, w, t, b, **kw):
        h2 = h.as_subclass(_Wrapped) if which != "weight" else h
        w2 = w.as_subclass(_Wrapped) if which != "hidden" else w
        loss = linear_cross_entropy(h2, w2, t, b, **kw)
        assert type(loss) is _Wrapped
        return loss

    h, w, b, t = make(device, torch.float32, lead=(3, 9), H=16, V=50)
    check(f"subclass {which}", wrapped, h, w, b, t, seed)
    gh = torch.autograd.grad(wrapped(h, w, t, b), h, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="second derivative through a fused op"):
        torch.autograd.grad(gh.square().sum(), w)


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_gradient_is_taken_where_autograd_records_nothing(device, path, mode, monkeypatch):
    """Under ``no_grad`` / ``inference_mode`` (an evaluation of a model whose head trains) the eager path
    still computed every gradient of the inputs that require grad, then dropped them: the hidden's, the
    logits' or an fp32 vocab x hidden buffer, 8x the loss's own time. The loss alone runs now, the same
    loss bit for bit."""
    import mmfast.ops.loss as loss_mod

    monkeypatch.setenv("MMFAST_EAGER", path)
    asked, real = [], loss_mod._loss_and_grads
    monkeypatch.setattr(loss_mod, "_loss_and_grads", lambda *a: asked.append(a[7:10]) or real(*a))
    h, w, b, t = make(device, torch.float32, lead=(3, 9), H=16, V=50)
    with_grad = linear_cross_entropy(h, w, t, b)
    assert asked == [(True, True, True)]
    with getattr(torch, mode)():
        loss = linear_cross_entropy(h, w, t, b)
    assert asked[1:] == [(False, False, False)] and not loss.requires_grad
    assert torch.equal(loss, with_grad.detach())


@pytest.mark.parametrize("args", ["all", "frozen-weight", "bf16-hidden-only"])
def test_custom_op_opcheck(device, args):
    h, w, b, t = make(device, torch.float32, lead=(3, 9), H=16, V=50)
    scale = torch.tensor(0.1, device=device, dtype=torch.float64)
    a = {"all": (h, w, b, t, IGNORE, None, 0, True, True, True, torch.float32),
         "frozen-weight": (h, w.detach(), None, t, IGNORE, scale, 4, True, False, False, torch.float32),
         "bf16-hidden-only": (h.detach().bfloat16().requires_grad_(), w.detach().bfloat16(), None, t, IGNORE,
                              None, 0, True, False, False, torch.bfloat16)}[args]
    torch.library.opcheck(torch.ops.mmfast.linear_cross_entropy_fwd.default, a)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph(device, seed, dynamic):
    """torch.compile traces the loss without a graph break (the row selection is inside the op); loss and
    gradients are the op path's bits, and the op path meets the accuracy rule above."""
    torch._dynamo.reset()
    h, w, b, t = make(device, torch.bfloat16)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)

    fn = torch.compile(lambda h, w, t, b: linear_cross_entropy(h, w, t, b, num_items_in_batch=torch.tensor(50)),
                       backend=backend, fullgraph=True, dynamic=dynamic)
    loss = fn(h, w, t, b)
    assert len(graphs) == 1 and sum("linear_cross_entropy_fwd" in op for op in graphs[0]) == 1
    g = grads(loss, (h, w, b))
    scale = torch.tensor(1 / 50, dtype=torch.float64)
    ref = torch.ops.mmfast.linear_cross_entropy_fwd(h, w, b, t, IGNORE, scale, 0, True, True, True, h.dtype)[0]
    assert torch.equal(loss, ref)
    assert all(torch.equal(x, y) for x, y in zip(g, grads(ref, (h, w, b))))


def test_compile_under_autocast(device, seed):
    """An fp32 model under bf16 autocast, compiled: the same bits as the op path in eager under autocast."""
    torch._dynamo.reset()
    h, w, b, t = make(device, torch.float32)
    kind = torch.device(device).type
    fn = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)
    with torch.autocast(kind, dtype=torch.bfloat16):
        loss = fn(h, w, t, b)
    with torch.autocast(kind, dtype=torch.bfloat16):
        ref = torch.ops.mmfast.linear_cross_entropy_fwd(h, w, b, t, IGNORE, None, 0, True, True, True,
                                                        torch.bfloat16)[0]
    assert loss.dtype == torch.float32 and torch.equal(loss, ref)
    g, g_ref = grads(loss, (h, w, b)), grads(ref, (h, w, b))
    assert all(x.dtype == torch.float32 and torch.equal(x, y) for x, y in zip(g, g_ref))


def test_custom_op_is_tagged_cudagraph_unsafe():
    """Its row selection syncs with the host, which a CUDA-graph capture forbids; Inductor's cudagraph
    trees read the tag and keep the graph holding it out of a capture."""
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    h, w, b, t = make("cpu", torch.float32, lead=(2, 5), H=8, V=11)
    gm = torch.fx.symbolic_trace(lambda h, w, t: torch.ops.mmfast.linear_cross_entropy_fwd.default(
        h, w, None, t, IGNORE, None, 0, True, False, False, torch.float32)[0])
    node = get_first_incompatible_cudagraph_node(gm)
    assert node is not None and "linear_cross_entropy_fwd" in str(node.target)
