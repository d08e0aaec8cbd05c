"""The fused LM-head loss as ``mmfast.patch`` installs it in HF causal LMs: when it runs, what the output
holds, the HF loss arguments it honours, lifecycle. Numerics of the loss itself: test_loss.py; whole-model
loss and gradients against float64: test_patch.py::test_patched_matches_unpatched."""

import contextlib
import copy
import pickle
import warnings

import pytest
import torch

import mmfast
from model_accuracy import assert_model_accurate_over_draws, double_inputs, run_model
from mmfast.ops import loss as loss_ops
from mmfast.patching import core
from mmfast.patching.loss import is_fused
from spy import as_from
from tiny_models import batch, build

KINDS = ["llama", "llava"]


@pytest.fixture
def calls(monkeypatch):
    """The rows each fused-loss call computed (hidden rows, labelled rows)."""
    seen = []
    real = loss_ops._LinearCrossEntropyFn.forward

    def spy(ctx, hidden, weight, bias, target, *rest):
        seen.append((target.numel(), int((target != rest[0]).sum())))
        return real(ctx, hidden, weight, bias, target, *rest)

    monkeypatch.setattr(loss_ops._LinearCrossEntropyFn, "forward", staticmethod(spy))
    return seen


@pytest.fixture
def counting_backend():
    """A torch.compile backend that runs each graph as traced, and the list of graphs it was given (Dynamo's
    caches reset before and after, so counts start from nothing)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    yield backend, graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_uses_it_and_returns_no_logits(kind, calls):
    model = build(kind)
    report = mmfast.patch(model, tuning="layernorm", verbose=False)
    assert report.fused_loss == "on" and "fused LM-head loss: on" in report.summary()
    inputs = batch(kind)
    out = model(**inputs)
    assert out.logits is None and "logits" not in out and out.loss.requires_grad
    out.loss.backward()
    assert model.lm_head.weight.grad is not None
    labelled = int((inputs["labels"][:, 1:] != -100).sum())
    assert calls == [(inputs["labels"].numel(), labelled)]  # the shifted labels: the last position ignored
    if kind == "llava":  # image positions carry -100: their logits are never computed
        assert labelled < inputs["labels"].numel() * 0.7


@pytest.mark.parametrize("kind", KINDS)
def test_unfused_when_logits_are_wanted(kind, calls):
    """Without labels, without grad (evaluation, generate) or disabled: the model runs as unpatched and
    returns its logits."""
    model = build(kind)
    mmfast.patch(model, verbose=False)
    inputs = batch(kind)
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    assert model(**no_labels).logits is not None
    with torch.no_grad():
        assert model(**inputs).logits is not None and model(**inputs).loss is not None
    with mmfast.disabled():
        assert model(**inputs).logits is not None
    assert calls == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_frozen_model_in_grad_mode_returns_its_logits(kind, calls):
    """A model with every parameter frozen, called with labels outside ``no_grad`` (a teacher, an evaluation
    script that forgot it): autograd records nothing, so no backward will use a fused loss; the call got
    ``logits=None`` all the same, where unpatched gives the logits. It runs as unpatched now."""
    model = build(kind)
    mmfast.patch(model, verbose=False)
    plain = _unpatched_twin(model)
    for m in (model, plain):
        m.requires_grad_(False)
    inputs = batch(kind)
    out, want = model(**inputs), plain(**inputs)
    assert out.logits is not None and not out.loss.requires_grad
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-5)
    assert calls == []
    model.lm_head.weight.requires_grad_(True)  # something trains through the head: fused again
    assert model(**inputs).logits is None and len(calls) == 1


def test_logits_to_keep_by_position(calls):
    """``logits_to_keep`` passed by position, as by keyword, runs the model as unpatched and returns its
    logits (it was seen by keyword only: the fused loss ran and the logits came back None)."""
    import inspect

    model = build("llama")
    plain = copy.deepcopy(model)
    mmfast.patch(model, verbose=False)
    inputs = batch("llama")
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    args = [None] * (names.index("logits_to_keep") + 1)
    args[names.index("input_ids")], args[names.index("labels")], args[-1] = inputs["input_ids"], inputs["labels"], 1
    shift = inputs["labels"][:, -1:].clone()
    out, want = model(*args, shift_labels=shift), plain(*args, shift_labels=shift)
    assert out.logits is not None and out.logits.shape == want.logits.shape
    torch.testing.assert_close(out.loss, want.loss)
    assert calls == []


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_training_step_keeps_it(kind):
    """torch.compile(fullgraph=True) of a patched model traces the fused loss (one custom op, the row
    selection inside it): no logits, and the eager fused loss's value and gradients. Unlike the eager path
    the op keeps the hidden gradient at the hidden's full shape (module docstring of mmfast.ops.loss)."""
    torch._dynamo.reset()
    model = build(kind)
    mmfast.patch(model, tuning="layernorm", verbose=False)
    inputs = batch(kind)
    eager = model(**inputs)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    # LLaVA's own forward cannot be traced whole on every torch in range (torch 2.11 fails at its
    # masked_scatter unpatched too), so fullgraph is asked of the LLaMA only
    out = torch.compile(model, backend=backend, fullgraph=kind == "llama")(**inputs)
    assert sum("mmfast.linear_cross_entropy_fwd" in op for g in graphs for op in g) == 1
    assert out.logits is None and "logits" not in out
    torch.testing.assert_close(out.loss, eager.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager_grads.keys() and "lm_head.weight" in grads
    for n in grads:
        torch.testing.assert_close(grads[n], eager_grads[n])


@pytest.mark.parametrize("tuning, traced", [("layernorm", False), ("mma", False), ("layernorm", True)],
                         ids=["layernorm-graphs", "mma-graphs", "layernorm-aot"])  # (the loss's backward: one)
def test_compiled_training_with_new_shapes_every_step_stops_compiling(tuning, traced, counting_backend):
    """torch.compile runs each hook of a compiled model as a frame of its own, and gives a tensor a frame finds
    on a torch.nn module (the LM head) a static shape: the labels the fused loss's hook stored on the head
    made the model's forward compile again for every new sequence length, up to the recompile limit (after
    which it ran uncompiled). Now, as unpatched, one recompile makes the shapes dynamic, and nothing more.
    ``aot``: AOTAutograd traces the backward too (as every real backend does), where the loss's blockwise
    scaling looped over the symbolic size of the gradient and guarded on it: a compile per new length."""
    backend, graphs = counting_backend
    if traced:
        aot, count = torch._dynamo.lookup_backend("aot_eager"), backend

        def backend(gm, example_inputs):
            count(gm, example_inputs)
            return aot(gm, example_inputs)
    model = build("llama")
    mmfast.patch(model, tuning=tuning, verbose=False)
    compiled = torch.compile(model, backend=backend)
    counts = []
    for B, S in ((2, 9), (3, 12), (2, 17), (3, 23), (2, 31)):  # (both change at once: one recompile)
        out = compiled(**batch("llama", B=B, S=S))
        assert out.logits is None  # fused
        out.loss.backward()
        counts.append(len(graphs))
    assert counts[2:] == [counts[1]] * 3, counts


def test_compiled_training_with_dynamic_marked_inputs():
    """``torch._dynamo.mark_dynamic`` on the batch and sequence dimensions: the fused loss's stored labels,
    static, specialised them (ConstraintViolationError)."""
    torch._dynamo.reset()
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    ref = copy.deepcopy(model)
    inputs = batch("llama", B=2, S=12)
    for key in ("input_ids", "labels"):
        torch._dynamo.mark_dynamic(inputs[key], 0)
        torch._dynamo.mark_dynamic(inputs[key], 1)
    try:
        out = torch.compile(model, backend="eager")(**inputs)
    finally:
        torch._dynamo.reset()
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref(**inputs).loss)


def test_models_compiled_one_after_another_share_their_compiled_code(counting_backend):
    """Each fused head's call is found through a module-level stack by an index, 0 for every model, that
    compiled code specialises on: a key per head compiled every new model's forward again, and past the
    recompile limit (8 models: a hyperparameter search, a policy and a reference model) ran it uncompiled."""
    backend, graphs = counting_backend
    counts = []
    for seed in range(4):
        model = build("llama", seed=seed)
        mmfast.patch(model, tuning="layernorm", verbose=False)
        out = torch.compile(model, backend=backend)(**batch("llama"))
        assert out.logits is None
        out.loss.backward()
        counts.append(len(graphs))
    assert counts[1:] == [counts[0]] * 3, counts


def test_calls_of_two_models_ending_out_of_order():
    """Model B armed while model A's call is open (B run from A's forward, or from another thread), A's call
    ending first: B's call keeps its place (ending A's removed everything above it, B's included)."""
    from mmfast.patching import loss

    a, b = build("llama"), build("llama", seed=1)
    for m in (a, b):
        mmfast.patch(m, verbose=False)
    inputs = batch("llama")
    ha, hb = (m.lm_head.__dict__[loss._STATE] for m in (a, b))
    loss._arm_hook(a, (), dict(inputs))
    loss._arm_hook(b, (), dict(inputs))
    assert (ha.slot, hb.slot) == (0, 1)
    loss._disarm_hook(a, (), {}, None)
    assert hb.slot == 1 and loss._STACK[1].armed is not None
    stand_in = loss._head_forward(b.lm_head, torch.randn(2, 12, 40))  # B's head, after A's call ended
    assert stand_in.shape == (2, 12, 64) and loss._STACK[1].loss is not None
    loss._disarm_hook(b, (), {}, None)
    assert loss._STACK == [] and ha.slot is None and hb.slot is None


def test_a_cut_call_of_a_freed_model_leaves_nothing_held():
    """A KeyboardInterrupt inside a training forward runs no forward hook after it: its call (the loss and
    its graph) stays on the stack until the model runs again; a model freed after it lets it go, and a copy
    of the model starts unarmed."""
    import gc
    import weakref

    from mmfast.patching import loss

    model = build("llama")
    mmfast.patch(model, verbose=False)

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    handle = model.model.norm.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(**batch("llama"))
    handle.remove()
    assert model.lm_head.__dict__[loss._STATE].slot == 0 and loss._STACK[0].armed is not None
    assert copy.deepcopy(model).lm_head.__dict__[loss._STATE].slot is None
    weight = weakref.ref(model.lm_head.weight)
    del model
    gc.collect()
    assert weight() is None and all(c.empty() for c in loss._STACK)
    other = build("llama")
    mmfast.patch(other, verbose=False)
    other(**batch("llama")).loss.backward()
    assert loss._STACK == []


def test_tuple_output_and_hf_loss_arguments():
    model = build("llama")
    mmfast.patch(model, verbose=False)
    ref = copy.deepcopy(model)
    mmfast.unpatch(ref)
    inputs = batch("llama")
    out = model(**inputs, return_dict=False)
    assert out[0].dim() == 0 and all(x.dim() != 3 for x in out if torch.is_tensor(x))  # loss first, no logits
    torch.testing.assert_close(out[0], ref(**inputs).loss)
    n = torch.tensor(5)
    torch.testing.assert_close(model(**inputs, num_items_in_batch=n).loss,
                               ref(**inputs, num_items_in_batch=n).loss)
    shift = torch.roll(inputs["labels"], -2, dims=1)
    torch.testing.assert_close(model(**inputs, shift_labels=shift).loss, ref(**inputs, shift_labels=shift).loss)


@pytest.mark.parametrize("kind", KINDS)
def test_another_ignore_index_as_hf_takes_it(kind, calls):
    """HF's causal-LM loss takes ``ignore_index`` as a keyword of the model's call: the labels equal to it are
    left out, and it pads the shifted labels' last position. Here a token id (7, on the first positions), so
    a fused loss ignoring -100 instead counted those positions, and a pad of -100 was out of range. Loss
    and gradients equal the unpatched model's."""
    inputs = batch(kind)
    inputs["labels"][:, :4] = 7
    inputs["labels"][inputs["labels"] == -100] = 7  # (llava's image positions: -100 would be out of range)
    model = build(kind)
    mmfast.patch(model, tuning="layernorm", verbose=False)
    got = {}
    for patched in (True, False):
        model.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if patched else mmfast.disabled():
            loss = model(**inputs, ignore_index=7).loss
            loss.backward()
        got[patched] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    labelled = int((inputs["labels"][:, 1:] != 7).sum())
    assert calls == [(inputs["labels"].numel(), labelled)]
    torch.testing.assert_close(got[True][0], got[False][0], rtol=1e-6, atol=1e-6)
    assert got[True][1].keys() == got[False][1].keys()
    for n, g in got[False][1].items():
        torch.testing.assert_close(got[True][1][n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_matches_unfused_model_under_autocast(seed):
    """An fp32 model under bf16 autocast (HF Trainer's bf16=True): loss and gradients held to the unfused
    model's bf16 error against the float64 model, over 24 draws (rule: model_accuracy.py). A loss is one
    number per draw: at 8 draws, seed 1922764172 failed at 2.7x PyTorch's max error while 48 draws gave
    mean errors of 1.0e-4 (fused) and 1.2e-4 (PyTorch), one distribution; the max of 8 against the max of
    8 is too noisy (the same count test_mlp_patch.py's CLIP check needed)."""
    model = build("llava", seed)
    ref64 = copy.deepcopy(model).double()
    plain = copy.deepcopy(model)
    mmfast.patch(model, tuning="layernorm", master_weights=False, verbose=False)
    for m in (plain, ref64):  # the recipe, then HF's own forwards (the oracle stays float64)
        mmfast.patch(m, tuning="layernorm", master_weights=False, verbose=False)
        mmfast.unpatch(m)
    draws = []  # pooled: the fused SwiGLU gate rounds once where the unfused MLP rounds twice
    for i in range(24):
        inputs = batch("llava", seed + i)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, lowp = run_model(model, inputs), run_model(plain, inputs)
        draws.append((ours, lowp, run_model(ref64, double_inputs(inputs))))
    assert_model_accurate_over_draws(draws, seed)


def test_opt_out_unpatch_disable_and_pickle():
    model = build("llava")
    report = mmfast.patch(model, fused_loss=False, verbose=False)
    assert report.fused_loss == "off" and "forward" not in model.__dict__
    mmfast.patch(model, verbose=False)
    # the model's own forward is left alone (hooks arm the head), the head's is patched
    assert is_fused(model) and "forward" not in model.__dict__ and core.is_patched(model.lm_head)
    clone = pickle.loads(pickle.dumps(model))
    inputs = batch("llava")
    assert clone(**inputs).logits is None
    torch.testing.assert_close(clone(**inputs).loss, model(**inputs).loss)
    mmfast.patch(model, fused_loss=False, verbose=False)  # a later call without it takes it out
    assert not is_fused(model) and not model._forward_hooks and "_loss_function" not in model.__dict__
    mmfast.patch(model, verbose=False)
    assert mmfast.unpatch(model) > 2
    for m in (model, model.lm_head):
        assert not core.is_patched(m) and "forward" not in m.__dict__
    assert not is_fused(model) and not model._forward_hooks and not model._forward_pre_hooks
    assert "_loss_function" not in model.__dict__ and model(**inputs).logits is not None


def test_not_installed_with_reason():
    model = build("llava")
    model.loss_function = lambda **kw: torch.zeros(())  # a user's own loss hook
    assert "custom loss_function" in mmfast.patch(model, verbose=False).fused_loss
    vision = build("clip-vision")
    assert mmfast.patch(vision, verbose=False).fused_loss == "n/a (no lm_head)"
    # a head of another class named Linear (PEFT's LoRA layer) is named by its module
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(build("llama"), LoraConfig(target_modules=["lm_head"], r=2))
    assert "lm_head is peft.tuners.lora.layer.Linear, not torch.nn.Linear" in mmfast.patch(lora, verbose=False).fused_loss


def test_a_head_of_a_linear_subclass_is_not_fused():
    """An LM head whose class subclasses nn.Linear with a forward of its own (bitsandbytes' Linear8bitLt and
    Linear4bit, a user's scaled head): the fused loss, which reads the weight as a plain Linear's, stays off,
    and training computes the head's own logits and loss."""
    class Halved(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    model = build("llama")
    head = Halved(model.lm_head.in_features, model.lm_head.out_features, bias=model.lm_head.bias is not None)
    head.load_state_dict(model.lm_head.state_dict())
    model.lm_head = head
    ref = copy.deepcopy(model)
    assert "not torch.nn.Linear" in mmfast.patch(model, tuning="layernorm", verbose=False).fused_loss
    mmfast.patch(ref, tuning="layernorm", fused_loss=False, verbose=False)
    _same_step(model, ref)


def test_hf_signature_kept():
    """Trainer keeps the dataset columns the forward's signature names; generate checks kwargs by it."""
    import inspect

    model = build("llava")
    before = inspect.signature(model.forward)
    mmfast.patch(model, verbose=False)
    assert inspect.signature(model.forward) == before and "labels" in before.parameters


def test_head_output_passed_on_by_a_wrapper():
    """A hook that hands the head's output on as a new tensor over the same memory (DeepSpeed ZeRO-3 does
    this, through an autograd function whose backward gathers the head's weight again): the loss equals
    the unpatched one, and its backward runs through the hook's backward before the fused loss's."""
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    ref = copy.deepcopy(model)
    mmfast.unpatch(ref)
    order = []

    class PassOn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.detach()

        @staticmethod
        def backward(ctx, g):
            order.append("hook")
            return g

    real_bwd = loss_ops._LinearCrossEntropyFn.backward

    def spy(ctx, *grads):
        order.append("loss")
        return real_bwd(ctx, *grads)

    loss_ops._LinearCrossEntropyFn.backward = staticmethod(spy)
    try:
        model.lm_head.register_forward_hook(as_from("deepspeed.runtime.zero.parameter_offload",
                                                     lambda m, args, out: PassOn.apply(out)))
        inputs = batch("llama")
        out = model(**inputs)
        assert out.logits is None
        torch.testing.assert_close(out.loss, ref(**inputs).loss)
        out.loss.backward()
    finally:
        loss_ops._LinearCrossEntropyFn.backward = real_bwd
    assert order == ["hook", "loss"]
    ref(**inputs).loss.backward()
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad)


def test_head_output_replaced_by_a_wrapper_raises():
    """A wrapper's hook that replaces the head's output (a copy, another tensor) would have HF's loss
    computed from the stand-in's values: it raises and says what to do."""
    model = build("llama")
    mmfast.patch(model, verbose=False)
    model.lm_head.register_forward_hook(as_from("accelerate.hooks", lambda m, args, out: out.clone()))
    with pytest.raises(RuntimeError, match="fused_loss=False"):
        model(**batch("llama"))


def _unpatched_twin(model):
    ref = copy.deepcopy(model)
    mmfast.unpatch(ref)
    return ref


def _same_step(model, ref, kind="llama"):
    """One training step of both: the same loss, and the same gradients of what trains."""
    inputs = batch(kind)
    out, expected = model(**inputs), ref(**inputs)
    torch.testing.assert_close(out.loss, expected.loss)
    out.loss.backward()
    expected.loss.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=n)
    return out


def test_a_users_head_hook_sees_the_logits(calls):
    """A forward hook of the user's on the LM head (a z-loss, logging, distillation) added after patching
    would have seen the stand-in (the loss broadcast): the step runs unfused instead, with one warning."""
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    ref = _unpatched_twin(model)
    seen = []
    model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    with pytest.warns(RuntimeWarning, match="forward hook on lm_head .* stand-in"):
        out = _same_step(model, ref)
    assert out.logits is not None and calls == []
    assert 0 not in seen[0].stride() and torch.equal(seen[0], out.logits.detach())  # logits, not a stand-in


@pytest.mark.parametrize("kind", ["backward hook", "backward pre-hook", "global forward hook"])
def test_a_users_head_hook_on_the_gradient_sees_the_logits_gradient(kind, calls):
    """A backward hook or pre-hook on the LM head, or a forward hook registered for every module, would have
    seen the stand-in's gradient or the stand-in itself (the loss broadcast): a backward hook got all ones,
    and a pre-hook that edits the logits' gradient (stop it at the pad token) zeroed every gradient, since
    the stand-in reads its element 0 back; silently. The step runs unfused, with one warning, and the
    hook edits what it does unpatched."""
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    ref = _unpatched_twin(model)
    seen = []
    handles = []
    if kind == "backward hook":
        for m in (model, ref):
            handles.append(m.lm_head.register_full_backward_hook(lambda mod, gi, go: seen.append(go[0].detach())))
    elif kind == "backward pre-hook":
        def stop_pad(mod, go):
            seen.append(go[0].detach())
            return (go[0].clone().index_fill_(-1, torch.tensor([0]), 0.0),)

        for m in (model, ref):
            handles.append(m.lm_head.register_full_backward_pre_hook(stop_pad))
    else:
        def log(mod, args, out):
            if mod is model.lm_head or mod is ref.lm_head:
                seen.append(out.detach())

        handles.append(torch.nn.modules.module.register_module_forward_hook(log))
    try:
        with pytest.warns(RuntimeWarning, match=f"{kind.removeprefix('global ')} .*stand-in"):
            _same_step(model, ref)
    finally:
        for h in handles:
            h.remove()
    assert calls == [] and len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1])
    assert 0 not in seen[0].stride()


def test_a_users_head_pre_hook_keeps_the_fused_loss(calls):
    """A forward pre-hook on the LM head sees (and may change) the head's input, which the fused loss reads
    after it: the loss stays fused (it was turned off, with a warning that the hook would see a stand-in)."""
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    ref = _unpatched_twin(model)
    for m in (model, ref):
        m.lm_head.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (mmfast's; Triton 3.6's interpreter warns of NumPy's)
        out = _same_step(model, ref)
    assert out.logits is None and len(calls) == 1


def _mask_prompt(mod, args, kwargs):
    labels = kwargs["labels"].clone()
    labels[:, :4] = -100
    return args, {**kwargs, "labels": labels}


def test_a_pre_hook_on_the_model_after_patching_changes_the_labels(calls):
    """A forward pre-hook on the model registered after patching that edits the labels (mask a prompt): the
    fused loss had read them before it ran, and computed the loss of the labels as given, silently. That
    call runs unfused, with a warning; the fused loss's hook then runs last, and later calls are fused with
    the edited labels."""
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    ref = _unpatched_twin(model)
    for m in (model, ref):
        m.register_forward_pre_hook(_mask_prompt, with_kwargs=True)
    with pytest.warns(RuntimeWarning, match="pre-hook was registered on the model after patching"):
        assert _same_step(model, ref).logits is not None
    assert calls == []
    model.zero_grad()
    ref.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (mmfast's; Triton 3.6's interpreter warns of NumPy's)
        assert _same_step(model, ref).logits is None
    assert len(calls) == 1 and calls[0][1] == 2 * (12 - 4)  # the 8 labels left of 12 per sample are targets


def test_a_pre_hook_on_the_model_after_patching_under_compile(monkeypatch):
    """The same under torch.compile (fullgraph), where the fused loss's hook cannot be moved: compiled calls
    run unfused, with the edited labels, and say so once (at trace time)."""
    from mmfast.ops import backend

    monkeypatch.setattr(backend, "_warned", set())  # (said once per process)
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    ref = _unpatched_twin(model)
    for m in (model, ref):
        m.register_forward_pre_hook(_mask_prompt, with_kwargs=True)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(2):
                model.zero_grad()
                ref.zero_grad()
                assert _same_step(compiled, ref).logits is not None
    finally:
        torch._dynamo.reset()
    assert sum("pre-hook was registered on the model after patching" in str(w.message) for w in seen) == 1


def test_a_users_forward_hook_on_the_model_sees_no_stand_in(calls):
    """A forward hook on the model registered before patching ran before the fused loss's and saw the
    stand-in as ``logits`` (the loss broadcast, zero strides); it sees the output the model returns."""
    model = build("llama")
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append(out.logits))
    mmfast.patch(model, tuning="layernorm", verbose=False)
    out = model(**batch("llama"))
    assert len(calls) == 1 and seen == [None] and out.logits is None


def test_a_second_head_call_in_one_training_forward_raises(calls):
    """An auxiliary call of the LM head from a hook inside the forward (logit lens, early exit) took the
    fused loss's arming and got the stand-in; the step then raised that a hook had replaced the head's
    output. It raises at the second call, saying what happened."""
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    aux = []

    def logit_lens(mod, args, out):
        aux.append(model.lm_head(model.model.norm(out[0] if isinstance(out, tuple) else out)))

    model.model.layers[0].register_forward_hook(logit_lens)
    with pytest.raises(RuntimeError, match="LM head was called twice in one training forward"):
        model(**batch("llama"))
    model.model.layers[0]._forward_hooks.clear()
    assert model(**batch("llama")).logits is None  # nothing left armed


def test_a_loss_function_set_after_patching_is_used(calls):
    """HF's ``model.loss_function = ...`` after patching: the fused loss would bypass it (and handed it
    the stand-in): the step runs unfused with the user's function, with one warning."""
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    ref = _unpatched_twin(model)

    def z_loss(logits, labels, vocab_size, **kw):
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return ce + 1e-3 * torch.logsumexp(logits.float(), -1).square().mean()

    model.loss_function = ref.loss_function = z_loss
    with pytest.warns(RuntimeWarning, match="loss_function was set"):
        _same_step(model, ref)
    assert calls == []


def test_a_replaced_lm_head_runs_unfused_until_patched_again(calls):
    """``resize_token_embeddings`` (a new LM head) after patching: every forward still runs (they failed),
    training unfused with one warning; ``mmfast.patch`` again fuses the new head, and a head replaced after
    that warns again."""
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    ref = _unpatched_twin(model)
    with pytest.warns(RuntimeWarning, match="lm_head was replaced"):
        _same_step(model, ref)
    assert calls == []
    with torch.no_grad():
        assert model(**batch("llama")).logits.shape[-1] == model.config.vocab_size
    assert mmfast.patch(model, tuning="layernorm", verbose=False).fused_loss == "on"
    out = model(**batch("llama"))
    assert out.logits is None and len(calls) == 1
    model.resize_token_embeddings(model.config.vocab_size + 8)  # replaced again: said again (not once ever)
    with pytest.warns(RuntimeWarning, match="lm_head was replaced"):
        model(**batch("llama"))
    assert len(calls) == 1


def test_a_model_whose_loss_is_not_the_causal_lm_loss():
    """The fused loss computes HF's causal-LM loss: a subclass with a loss_function of its own is left
    unfused at patch time, and a loss_type set to another loss after patching trains unfused with a warning
    (both got the stand-in, or the shifted causal loss, silently)."""
    from transformers import LlamaForCausalLM
    from transformers.loss.loss_utils import ForCausalLMLoss

    class WithZLoss(LlamaForCausalLM):
        def loss_function(self, logits, labels, vocab_size, **kw):
            z = logits.float().logsumexp(-1).square().mean()
            return ForCausalLMLoss(logits, labels, vocab_size, **kw) + 1e-2 * z

    own = build("llama")
    own.__class__ = WithZLoss
    ref = _unpatched_twin(own)
    assert "defines its own loss_function" in mmfast.patch(own, tuning="layernorm", verbose=False).fused_loss
    _same_step(own, ref)

    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    ref = _unpatched_twin(model)
    model.loss_type = ref.loss_type = "ForMaskedLM"
    with pytest.warns(RuntimeWarning, match="loss_type='ForMaskedLM'"):
        _same_step(model, ref)


def test_accelerate_regional_compilation_keeps_the_fused_loss():
    """Accelerate's regional compilation copies the model's top module and compiles its repeated blocks and
    the head: the patched top forward ran the original module (every region uncompiled, silently); and a
    compiled head was taken for a replaced one (fused loss off). The fused loss is hooks on the model now,
    which run with the copy, and the head inside the compile wrapper is the patched one."""
    import accelerate.utils

    compile_regions = getattr(accelerate.utils, "compile_regions", None)
    if compile_regions is None:
        pytest.skip("this Accelerate has no regional compilation")
    torch._dynamo.reset()
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    inputs = batch("llama")
    ref = model(**inputs, use_cache=False).loss
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = compile_regions(model, backend=backend)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*fused LM-head loss is off")
            out = compiled(**inputs, use_cache=False)
        out.loss.backward()
    finally:
        torch._dynamo.reset()
    assert graphs and out.logits is None
    torch.testing.assert_close(out.loss, ref)


def test_under_an_accelerate_hook_on_the_model_the_loss_fuses_inside_it():
    """An Accelerate hook on the model (device_map dispatch, offloading) moves the inputs before its forward
    and the output after it: the fused loss goes inside it (as the model's forward), so the labels are
    moved before the head is armed and the hook never moves the stand-in (moved to another device it becomes
    a whole logits tensor, and the output kept it). A hook added after patching turns the fused loss off
    with a warning until the model is patched again."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Seen(ModelHook):
        logits = []

        def post_forward(self, module, output):
            self.logits.append(output.logits)
            return output

    inputs = batch("llama")
    for order in ("hook first", "patch first"):
        model = build("llama")
        Seen.logits = []
        if order == "hook first":
            add_hook_to_module(model, Seen())
        mmfast.patch(model, verbose=False)
        if order == "patch first":
            add_hook_to_module(model, Seen())
            with pytest.warns(RuntimeWarning, match="Accelerate hook was put on the model after patching"):
                assert model(**inputs).logits is not None
            mmfast.patch(model, verbose=False)
        Seen.logits = []
        out = model(**inputs)
        assert out.logits is None and Seen.logits == [None], order


def test_a_wrapper_calling_the_forward_directly_still_fuses(monkeypatch):
    """Some PEFT versions call the base model's ``forward`` directly, past its hooks: under a PEFT model the
    fused loss is the base model's forward, so it fuses there too."""
    from peft.tuners import tuners_utils

    def old_forward(self, *args, **kwargs):  # what such versions do
        return self.model.forward(*args, **kwargs)

    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(tuners_utils.BaseTuner, "forward", old_forward)
    # (a causal-LM PEFT model calls its tuner, whose forward calls the base model's)
    model = get_peft_model(build("llama"), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    assert mmfast.patch(model, tuning="layernorm", verbose=False).fused_loss == "on"
    assert model(**batch("llama")).logits is None


def test_the_head_called_alone_after_an_interrupted_step_gives_logits(calls):
    """A KeyboardInterrupt inside a training forward runs no hook after it, so the head stayed armed until the
    model's next call: the head called alone in grad mode (a distillation's own loss on the backbone's hidden
    states) returned the stale labels' loss broadcast to the logits' shape, and every later call of it raised
    "called twice", under no_grad and mmfast.disabled() too. It gives logits now, and the model trains fused."""
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    inputs = batch("llama")

    def interrupt(*_):
        raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(**inputs)
    handle.remove()
    hidden = model.model(input_ids=inputs["input_ids"]).last_hidden_state
    want = torch.nn.functional.linear(hidden, model.lm_head.weight)
    for context in (torch.enable_grad, torch.no_grad, mmfast.disabled, torch.enable_grad):
        with context():
            logits = model.lm_head(hidden)
        assert logits.stride()[-1] == 1 and torch.equal(logits, want), context
    # the traceback dropped (a training loop's except): the cut forward's frames are freed, and frames made
    # since take their addresses (the head called from helpers with frames of every size up to 40 locals)
    handle = model.model.layers[1].register_forward_hook(interrupt)
    helpers = {}
    exec("\n".join(f"def call{k}(head, x):\n    {', '.join(f'a{i}' for i in range(k)) or '_'} = "
                   f"{f'(None,) * {k}' if k else 'None'}\n    return head(x)" for k in range(40)), helpers)
    for k in range(40):
        try:
            model(**inputs)
        except KeyboardInterrupt:
            pass
        assert helpers[f"call{k}"](model.lm_head, hidden).stride()[-1] == 1, k
    handle.remove()
    calls.clear()
    out = model(**inputs)
    assert out.logits is None and len(calls) == 1
    out.loss.backward()


def test_bad_labels_raise_what_the_unpatched_model_raises():
    """Labels of another shape than the input (F.cross_entropy's batch mismatch: a ValueError) raised a
    RuntimeError, and a label out of the vocabulary (F.cross_entropy's IndexError) a ValueError; code that
    checks its data by catching HF's error types missed them."""
    inputs = batch("llama")
    ids = inputs["input_ids"]
    cases = {"shape": torch.zeros(ids.shape[0], ids.shape[1] + 2, dtype=torch.long),
             "value": torch.full_like(ids, build("llama").config.vocab_size + 6),
             "dtype": ids.int()}  # (the fused loss took int32 labels, so training ran and evaluation raised)
    kinds = {}
    for patched in (False, True):
        model = build("llama")
        if patched:
            mmfast.patch(model, tuning="layernorm", verbose=False)
        for name, labels in cases.items():
            with pytest.raises(Exception) as e:
                model(input_ids=ids, labels=labels)
            kinds.setdefault(name, []).append(type(e.value))
    for name, (unpatched, patched) in kinds.items():
        assert issubclass(patched, unpatched), (name, unpatched, patched)


def test_labels_of_another_shape_with_as_many_entries_as_hf_takes_them():
    """HF's loss shifts the labels along their last dimension and flattens them and the logits, so it takes
    labels of one sample without a batch dimension ([S] beside input_ids [1, S]); the fused loss refused
    them. Loss and gradients equal the unpatched model's."""
    inputs = batch("llama", B=1)
    ids = inputs["input_ids"]
    got = {}
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    for patched in (False, True):
        model.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if patched else mmfast.disabled():
            loss = model(input_ids=ids, labels=ids[0]).loss
            loss.backward()
        got[patched] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(got[True][0], got[False][0], rtol=1e-6, atol=1e-6)
    assert got[True][1].keys() == got[False][1].keys()
    for n, g in got[False][1].items():
        torch.testing.assert_close(got[True][1][n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_the_forwards_runner_is_call_impl_past_a_helper_with_the_model_as_self(monkeypatch, calls):
    """The armed call records the frame that runs the model's forward, so that a head call outside it (after a
    KeyboardInterrupt) is known for stale. A frame nearer the arming hook with the model as ``self`` (a
    helper that calls the hooks for Module._call_impl, as a torch version may have, or a user's wrapper)
    was taken for it; it has returned when the head runs, so every training forward was taken for cut and
    ran unfused, without a word."""
    from mmfast.patching import loss as fused

    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    arm = fused._arm_hook

    def helper(self, args, kwargs):  # the model as self, between _call_impl and the arming hook
        return arm(self, args, kwargs)

    monkeypatch.setattr(fused, "_arm_hook", lambda model, args, kwargs: helper(model, args, kwargs))
    key = next(k for k, h in model._forward_pre_hooks.items() if h is arm)
    model._forward_pre_hooks[key] = fused._arm_hook
    calls.clear()
    out = model(**batch("llama"))
    assert out.logits is None and len(calls) == 1
    out.loss.backward()


def _interrupt_a_forward(model, inputs):
    """A forward a KeyboardInterrupt cuts in the second layer: no forward hook runs after it."""
    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(**inputs)
    handle.remove()


def test_an_interrupted_training_step_leaves_no_armed_head():
    """A KeyboardInterrupt inside the forward runs no forward hook after it: the head stayed armed, and the
    next call without labels (an evaluation, generate) computed a loss against the stale labels. Every call
    disarms first now."""
    model = build("llama")
    mmfast.patch(model, verbose=False)
    inputs = batch("llama")
    _interrupt_a_forward(model, inputs)
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"])
    assert out.logits is not None and out.loss is None


def test_a_training_step_right_after_an_interrupted_one_leaves_nothing_armed(calls):
    """The training step right after one a KeyboardInterrupt cut (no hook ran after it) fuses and leaves no
    armed call behind: the cut call's entry, with its labels, stayed on the stack for good (one more per
    cut) and every later call took index 1, which compiled code specialises on."""
    from mmfast.patching import loss

    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    inputs = batch("llama")
    _interrupt_a_forward(model, inputs)
    out = model(**inputs)
    out.loss.backward()
    assert out.logits is None and len(calls) == 1 and loss._STACK == []


def test_training_forwards_of_two_models_on_two_threads_keep_their_own_losses(monkeypatch):
    """The armed calls of every model share one stack. A head took its call's arguments off before computing
    the loss, so while it computed, the call looked emptied, and another model's forward ending then (on
    another thread) trimmed it off the stack: the first model's loss function raised IndexError, or read the
    call of a model armed at that index since (its loss). The interleaving, made deterministic: model B's
    whole training step runs while model A's head computes its loss."""
    import threading

    from mmfast.patching import loss as patched_loss

    a, b = build("llama", 0), build("llama", 1)
    for m in (a, b):
        mmfast.patch(m, tuning="layernorm", verbose=False)
    ia, ib = batch("llama", seed=1), batch("llama", seed=2, S=10)
    expected = {}
    for name, m, inputs in (("a", a, ia), ("b", b, ib)):
        expected[name] = m(**inputs).loss.item()
    real, seen = patched_loss.linear_cross_entropy, {}

    def interleaved(*args, **kwargs):
        if not seen:  # (A's head): B's step on another thread, run to its end meanwhile
            seen["b"] = None
            t = threading.Thread(target=lambda: seen.__setitem__("b", b(**ib).loss.item()))
            t.start()
            t.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(patched_loss, "linear_cross_entropy", interleaved)
    got = a(**ia).loss.item()
    assert got == pytest.approx(expected["a"], abs=1e-6)
    assert seen["b"] == pytest.approx(expected["b"], abs=1e-6)
    assert not patched_loss._STACK
