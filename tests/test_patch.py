"""mmfast.patch on HuggingFace LLaMA, CLIP (vision, text) and LLaVA: numerics, structure, lifecycle."""

import copy
import functools
import inspect
import types

import pytest
import torch
from torch import nn

import mmfast
from model_accuracy import (assert_model_accurate, assert_model_accurate_over_draws, double_inputs, draw,
                            float64_norms, run_model)
from mmfast.nn import norm as nn_norm
from mmfast.patching import core
from spy import count_calls
from tiny_models import batch, build, first_output, llama4_text_config, lora_llama

KINDS = ["llama", "clip-vision", "clip-text", "siglip-vision", "llava"]
EXPECTED_PATCHED = {  # module kinds every tiny model must have patched
    "llama": {"rms_norm"},
    "clip-vision": {"layer_norm"},
    "clip-text": {"layer_norm"},
    "siglip-vision": {"layer_norm"},
    "llava": {"rms_norm", "layer_norm"},
}


@pytest.mark.parametrize("kind", KINDS)
def test_patched_matches_unpatched(kind, seed):
    """Output, loss and every gradient of the patched model vs the unpatched one, both against the
    same model in float64, over 4 input draws (rule: tests/model_accuracy.py)."""
    model = build(kind, seed)
    ref_model = copy.deepcopy(model).double()
    plain = copy.deepcopy(model)
    report = mmfast.patch(model, verbose=False)
    assert {report.kinds[p] for p in report.patched} == EXPECTED_PATCHED[kind]
    if kind == "siglip-vision":  # SigLIP's MLPs have CLIP's forward with a tanh GELU: named, left alone
        assert report.skipped and all("not QuickGELU" in reason for _, reason in report.skipped)
    else:
        assert not report.skipped
    draws = []  # pooled: a tiny model's gradients are a few hundred numbers, one draw is a noisy sample
    for i in range(4):
        inputs = batch(kind, seed + i)
        draws.append(draw(model, plain, ref_model, inputs))
    assert_model_accurate_over_draws(draws, seed)


def _token_draws(model, plain, ref_model, seed: int, vocab: int) -> list:
    """4 draws (:func:`model_accuracy.draw`) of a causal LM's training step on random token ids."""
    draws = []
    for i in range(4):
        g = torch.Generator().manual_seed(seed + i)
        ids = torch.randint(1, vocab, (2, 12), generator=g)
        draws.append(draw(model, plain, ref_model, dict(input_ids=ids, labels=ids)))
    return draws


def test_llama4_text_norms_are_patched(seed, monkeypatch):
    """Llama 4's text RMSNorm computes LLaMA's norm in two methods (``forward`` calling ``_norm``), with its
    epsilon named ``eps`` in some transformers versions: it was left unpatched. Its norms are fused now, and
    the MoE model is as accurate as unpatched against float64 (4 draws pooled)."""
    import transformers as T
    from transformers.models.llama4.modeling_llama4 import Llama4TextRMSNorm

    torch.manual_seed(seed)
    model = T.Llama4ForCausalLM(T.Llama4TextConfig(**llama4_text_config(rms_norm_eps=3e-4)))
    with torch.no_grad():  # weights away from their init of ones
        for m in model.modules():
            if isinstance(m, Llama4TextRMSNorm):
                m.weight.normal_(1.0, 0.3)
    ref_model, plain = copy.deepcopy(model).double(), copy.deepcopy(model)
    report = mmfast.patch(model, verbose=False)
    norms = sorted(n for n, m in model.named_modules() if isinstance(m, Llama4TextRMSNorm))
    assert len(norms) == 5 and set(norms) <= set(report.patched), report.skipped
    calls = count_calls(monkeypatch, nn_norm, "rms_norm")
    draws = _token_draws(model, plain, ref_model, seed, vocab=128)
    assert len(calls) >= 5 * 4
    assert_model_accurate_over_draws(draws, seed)


@pytest.mark.parametrize("family", ["Mistral", "Qwen2", "Qwen3", "Phi3"])
def test_causal_lms_with_llamas_forward_in_their_own_words(family, seed, monkeypatch):
    """Mistral's, Qwen 2/3's and Phi-3's causal-LM forwards are LLaMA's code under their own docstrings: the
    code match compared docstrings too, so these models kept full-size logits (the fused loss was refused).
    It goes on them now, and the model is as accurate as unpatched against float64 (4 draws pooled)."""
    import transformers as T

    from mmfast.patching import loss as patched_loss

    shape = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, pad_token_id=0)
    if family != "Phi3":
        shape["head_dim"] = 8
    torch.manual_seed(seed)
    model = getattr(T, f"{family}ForCausalLM")(getattr(T, f"{family}Config")(**shape))
    ref_model, plain = copy.deepcopy(model).double(), copy.deepcopy(model)
    assert mmfast.patch(model, verbose=False).fused_loss == "on"
    calls = count_calls(monkeypatch, patched_loss, "linear_cross_entropy")
    draws = _token_draws(model, plain, ref_model, seed, vocab=96)
    assert len(calls) == 4
    assert_model_accurate_over_draws(draws, seed)


def test_optimizer_steps_match(seed):
    """A few AdamW steps of LayerNorm tuning: the patched model's updates to the trainable norms follow
    the unpatched model's, both against the same steps in float64 (all updates jointly, norm-wise). In its
    first steps Adam moves each weight by about lr * sign(gradient), so a weight whose gradient is near zero
    (near Adam's eps) moves by rounding noise, differently in every implementation: one such weight in 160
    (a float64 gradient of 2.6e-8 where the median is 6e-4) made the joint error of either implementation
    noise, and failed about one seed in 60. Weights whose float64 gradient at some step is below a
    thousandth of the median are left out of the comparison (at most a tenth of them)."""
    base = build("llava", seed)
    models = {"ours": copy.deepcopy(base), "lowp": copy.deepcopy(base), "ref": copy.deepcopy(base).double()}
    mmfast.patch(models["ours"], tuning="layernorm-simp", verbose=False)
    for name in ("lowp", "ref"):  # the same recipe with the original forwards (the oracle stays float64)
        mmfast.patch(models[name], tuning="layernorm-simp", master_weights=name == "lowp", verbose=False)
        mmfast.unpatch(models[name])
    assert all(p.dtype == torch.float64 for p in models["ref"].parameters())
    start = {k: p.detach().double() for k, p in base.named_parameters()}
    inputs = batch("llava", seed)
    deltas, smallest = {}, None
    for name, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        x = double_inputs(inputs) if name == "ref" else inputs
        for _ in range(3):
            run_model(model, x)  # (its float64 model's loss and RMSNorms in float64 too)
            if name == "ref":  # (in the deltas' order)
                g = torch.cat([p.grad.abs().flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
                smallest = g / g.median() if smallest is None else torch.minimum(smallest, g / g.median())
            opt.step()
        trained = {k: p.detach().double() for k, p in model.named_parameters() if p.requires_grad}
        deltas[name] = torch.cat([trained[k].flatten() - start[k].flatten() for k in sorted(trained)])
    assert deltas["ref"].numel() == 2 * 2 * 40 and deltas["ref"].abs().min() > 0
    kept = smallest >= 1e-3
    assert kept.sum() >= 0.9 * kept.numel(), f"{int((~kept).sum())} weights with a near-zero gradient (seed {seed})"
    deltas = {k: d[kept] for k, d in deltas.items()}
    err = (deltas["ours"] - deltas["ref"]).norm().item()
    err_lowp = (deltas["lowp"] - deltas["ref"]).norm().item()
    bound = 2 * err_lowp + torch.finfo(torch.float32).eps * deltas["ref"].norm().item()
    assert err <= bound, f"updates after 3 steps: ||error|| {err:.3e} > 2 x {err_lowp:.3e} + eps ||ref|| (seed {seed})"


@pytest.mark.parametrize("kind", KINDS)
def test_structure_unchanged(kind):
    model = build(kind)
    keys = list(model.state_dict())
    types_before = {n: type(m) for n, m in model.named_modules()}
    names = [n for n, _ in model.named_parameters()]
    report = mmfast.patch(model, verbose=False)
    assert list(model.state_dict()) == keys
    assert {n: type(m) for n, m in model.named_modules()} == types_before
    assert [n for n, _ in model.named_parameters()] == names
    assert len(report.patched) > 0
    for path in report.patched:
        assert "mmfast=" in repr(model.get_submodule(path))


@pytest.mark.parametrize("kind", KINDS)
def test_unpatch_is_exact(kind):
    model = build(kind)
    pristine = copy.deepcopy(model)
    inputs = batch(kind)
    mmfast.patch(model, verbose=False)
    n = mmfast.unpatch(model)
    assert n > 0
    for m in model.modules():
        assert not {"forward", "extra_repr", "_mmfast_patch", "_replicate_for_data_parallel"} & set(m.__dict__)
    assert repr(model) == repr(pristine)
    with torch.no_grad():
        assert torch.equal(first_output(model(**inputs)), first_output(pristine(**inputs)))


def test_unpatch_gives_back_an_extra_repr_the_module_had_before():
    """A norm with an ``extra_repr`` of its own on the instance before mmfast.patch (another tool's label)
    shows it with mmfast's mark while patched, and has it back after mmfast.unpatch (not the class's)."""
    model = build("llama")
    norm = model.model.norm
    norm.extra_repr = lambda: "labelled"
    mmfast.patch(model, verbose=False)
    assert norm.extra_repr() == "labelled, mmfast=rms_norm"
    mmfast.unpatch(model)
    assert norm.extra_repr() == "labelled" and "labelled" in repr(model)


def test_data_parallel_replication_is_refused():
    """torch.nn.DataParallel's replicate() copies each module's instance attributes into its replicas, so a
    patched forward would run the original module (the first GPU's weights) in every replica: refused with
    what to use instead; after unpatch a module replicates again. (replicate() itself needs GPUs; this is
    the call it makes on every module.)"""
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    norm = model.model.layers[0].input_layernorm
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        norm._replicate_for_data_parallel()
    with pytest.raises(RuntimeError, match="DataParallel"):
        model.lm_head._replicate_for_data_parallel()  # the fused loss's head
    mmfast.unpatch(model)
    replica = norm._replicate_for_data_parallel()
    assert type(replica) is type(norm) and "forward" not in replica.__dict__


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.bfloat16)])
def test_activations_into_an_rms_norm_of_another_dtype_return_what_hf_returns(x_dtype, w_dtype):
    """Activations into an RMSNorm whose weight has another dtype: HF rounds the normalised input to x's dtype
    and multiplies by the weight in the promoted dtype, fp32. fp32 activations into a bf16 norm (an fp32
    projector's or soft prompt's output) raised a dtype error; 16-bit ones into an fp32 norm (an fp32 model fed
    bf16 embeddings) came back in x's dtype (the fp32-master-weight rule, applied to weights no patch widened),
    so the fp32 projection after it failed, under ``mmfast.disabled()`` too (which cast the original forward's
    output to x's dtype); a weight of the other 16-bit dtype raised a TypeError."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(64).to(w_dtype)
    with torch.no_grad():
        norm.weight.normal_()
    ref = copy.deepcopy(norm)
    mmfast.patch(norm, verbose=False)
    x = torch.randn(3, 5, 64, dtype=x_dtype, requires_grad=True)
    y, y_ref = norm(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.float32
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn_like(y)
    y.backward(gy)
    gx, gw = x.grad, norm.weight.grad
    x.grad = None
    y_ref.backward(gy)
    torch.testing.assert_close(gx, x.grad)
    assert gw.dtype == w_dtype
    torch.testing.assert_close(gw, ref.weight.grad)  # fp32 sums rounded once to the weight's dtype
    with mmfast.disabled():
        assert norm(x).dtype == torch.float32


def test_an_fp32_model_fed_bf16_embeddings_runs_as_unpatched():
    """Its norms return fp32 into the fp32 projections, patched or under mmfast.disabled() (both failed)."""
    model = build("llama")
    plain = copy.deepcopy(model)
    mmfast.patch(model, verbose=False)
    emb = plain.get_input_embeddings()(batch("llama")["input_ids"]).to(torch.bfloat16)
    with torch.no_grad():
        expected = plain(inputs_embeds=emb).logits
        torch.testing.assert_close(model(inputs_embeds=emb).logits, expected)
        with mmfast.disabled():
            torch.testing.assert_close(model(inputs_embeds=emb).logits, expected)


def test_patch_twice_is_patch_once():
    model = build("llava")
    first = mmfast.patch(model, verbose=False)
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    second = mmfast.patch(model, verbose=False)
    assert second.patched == first.patched and second.skipped == first.skipped
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
    mmfast.unpatch(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_disable_env_and_context(monkeypatch):
    model = build("llama")
    inputs = batch("llama")
    with torch.no_grad():
        expected = first_output(model(**inputs))
    mmfast.patch(model, verbose=False)
    calls = count_calls(monkeypatch, nn_norm, "rms_norm")
    with torch.no_grad():
        model(**inputs)
        assert calls, "the patched model did not call the fused op"
        calls.clear()
        with mmfast.disabled():
            out = first_output(model(**inputs))
        assert not calls and torch.equal(out, expected)
        monkeypatch.setenv("MMFAST_DISABLE", "1")
        out = first_output(model(**inputs))
        assert not calls and torch.equal(out, expected)
        monkeypatch.setenv("MMFAST_DISABLE", "0")
        model(**inputs)
        assert calls


def test_float64_patched_model_says_what_runs_it():
    """The kernels take fp32/fp16/bf16: a patched model cast to float64 (a test oracle, say) raises naming
    the patched module and the two ways to run it, and runs inside ``mmfast.disabled()``."""
    model = build("llama")
    inputs = batch("llama")
    with torch.no_grad():
        expected = first_output(model.double()(**inputs))
    mmfast.patch(model, verbose=False)
    with pytest.raises(TypeError, match=r"LlamaRMSNorm was patched .*got float64.*mmfast\.disabled\(\).*unpatch"):
        model(**inputs)
    with mmfast.disabled(), torch.no_grad():
        assert torch.equal(first_output(model(**inputs)), expected)


def test_disabled_keeps_dtype_with_fp32_master_weights():
    """With fp32 norm weights in a bf16 model, the original LlamaRMSNorm returns fp32; disabled mode keeps
    the activations in bf16 so the rest of the model still runs."""
    model = build("llama", dtype=torch.bfloat16)
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    with mmfast.disabled():
        out = model(**batch("llama"))
    assert out.logits.dtype == torch.bfloat16


def test_meta_device_patch():
    from tiny_models import llava_config
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config())
    report = mmfast.patch(model, tuning="layernorm", verbose=False)
    assert report.patched and all(p.is_meta for p in model.parameters())


def test_report_table_and_log(capfd, monkeypatch):
    model = build("llava")
    report = mmfast.patch(model, tuning="layernorm-simp")
    err = capfd.readouterr().err
    assert err.count("mmfast.patch:") == 1 and "trainable params:" in err
    text = str(report)
    assert text.splitlines()[-1].startswith("trainable params: ")
    assert "|| all params: " in text and "|| trainable%: " in text
    assert "layers.*.input_layernorm" in text
    monkeypatch.setenv("RANK", "1")
    mmfast.patch(build("llava"), tuning="layernorm-simp")
    assert "mmfast.patch" not in capfd.readouterr().err  # logs on rank 0 only
    monkeypatch.setenv("RANK", "0")
    mmfast.patch(build("llava"), tuning="layernorm-simp", verbose=False)
    assert "mmfast.patch" not in capfd.readouterr().err  # verbose=False: nothing logged, on rank 0 too


@pytest.mark.parametrize("tuning", [None, "layernorm-simp", "mma"])
def test_pickle_and_deepcopy_keep_patch(tuning):
    """Whole-model pickling works with every recipe (the frozen-embedding hook of layernorm-simp was a
    local closure that could not be pickled); the copies keep the patch and the recipe's hooks."""
    import io
    import pickle

    model = build("llama")
    mmfast.patch(model, tuning=tuning, verbose=False)
    inputs = batch("llama")
    with torch.no_grad():
        ref = first_output(model(**inputs))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert core.is_patched(clone.model.norm) and core.binding_of(clone.model.norm.forward).args[0] is clone.model.norm
        with torch.no_grad():
            assert torch.equal(first_output(clone(**inputs)), ref)
        if tuning == "layernorm-simp":  # the copy's frozen embeddings still hand on a graph
            assert clone.model.embed_tokens(inputs["input_ids"]).requires_grad
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert core.is_patched(loaded.model.layers[0].input_layernorm)


@pytest.mark.parametrize("tuning", [None, "mma"])
def test_a_deep_copy_shows_its_forward_signatures_after_the_original_is_freed(tuning):
    """A deep copy (an EMA model, TRL's reference model) outlives the model it was copied from: the
    signatures of its patched norms and MLPs (what ``torch.export`` of a layer, or a tool binding arguments
    per module, reads) raised ReferenceError once the original was freed, as deepcopy keeps a method's
    function, whose signature was bound to the original module."""
    import gc

    model = build("llava")
    mmfast.patch(model, tuning=tuning, verbose=False)
    clone = copy.deepcopy(model)
    del model
    gc.collect()
    patched = [m for m in clone.modules() if core.is_patched(m) and isinstance(m.forward, types.MethodType)]
    assert {type(m).__name__ for m in patched} >= {"LlamaRMSNorm", "LayerNorm", "LlamaMLP", "CLIPMLP"}
    for m in patched:
        assert inspect.signature(m.forward) == inspect.signature(type(m).forward.__get__(m)), type(m).__name__
    clone(**batch("llava")).loss.backward()


@pytest.mark.parametrize("tuning", [None, "layernorm", "mma"])
def test_patched_model_freed_without_garbage_collection(tuning):
    """``del model`` frees a patched, trained model (and a deep copy of it) at once, as an unpatched one: the
    forwards, extra_repr, replication guard and fused loss patching puts on a module hold it weakly (a
    strong hold made every patched module a cycle that kept its GPU memory until a full collection)."""
    import gc
    import weakref

    model = build("llava")
    mmfast.patch(model, tuning=tuning, verbose=False)
    clone = copy.deepcopy(model)
    for m in (model, clone):
        m(**batch("llava")).loss.backward()
    held = model.model.language_model.norm.forward
    gc.collect()
    gc.disable()
    try:
        refs = [weakref.ref(x) for m in (model, clone) for x in (*m.modules(), *m.parameters())]
        del model, clone, m
        alive = sum(r() is not None for r in refs)
    finally:
        gc.enable()
    assert alive == 0, f"{alive} of {len(refs)} modules and parameters outlived their model"
    with pytest.raises(ReferenceError, match="has been freed"):
        held(torch.ones(2, 40))


def test_patched_forward_pickled_as_partial_still_loads():
    """A patched forward pickled by an earlier version (a ``functools.partial`` subclass: state is the
    partial's tuple) loads into the weakly bound forward, bound to its module."""
    model = build("llama")
    mmfast.patch(model, verbose=False, fused_loss=False, fused_mlp=False)
    norm = model.model.norm
    old = core._PatchedForward(core.patched_forward)
    old.__setstate__((core.patched_forward, (norm,), {}, {}))
    x = torch.randn(3, 40)
    assert old.args[0] is norm and torch.equal(old(x), norm(x))


def test_fused_loss_of_a_model_pickled_by_an_earlier_version():
    """A model pickled by an earlier version holds that version's fused loss: a replaced model forward and a
    functools.partial loss function (taken for a user's loss function: the fused loss went off with a
    warning). It runs fused; patching again moves it to the hooks and drops the old forward."""
    import warnings

    from mmfast.patching import loss

    model = build("llama")
    mmfast.patch(model, verbose=False, fused_loss=False)
    inputs = batch("llama")
    ref = model(**inputs).loss
    core._install(model, loss._MODEL, loss._model_forward, top=True)  # what such a pickle loads
    loss._install_head(model.lm_head)
    model._loss_function = functools.partial(loss._loss_function, model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fused LM-head loss is off")
        out = model(**inputs)
    assert out.logits is None  # the fused loss ran (it keeps no logits)
    torch.testing.assert_close(out.loss, ref)
    mmfast.patch(model, verbose=False)
    assert loss.is_fused(model) and "forward" not in model.__dict__
    assert isinstance(model.__dict__["_loss_function"], core.ModuleCall)
    assert model(**inputs).logits is None
    mmfast.unpatch(model)
    assert not {"forward", "_loss_function", "_mmfast_patch"} & set(model.__dict__) and not model._forward_hooks


def test_an_accelerate_hook_does_not_copy_the_weak_binding():
    """Accelerate's hook copies the wrapped forward's ``__dict__`` onto its own partial: the binding (function
    and weak reference) stays off it, so a deep copy of the hooked module has none pointing at the original."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = build("llama")
    mmfast.patch(model, verbose=False, fused_loss=False, fused_mlp=False)
    norm = model.model.norm
    want = inspect.signature(type(norm).forward.__get__(norm))
    assert inspect.signature(norm.forward) == want
    add_hook_to_module(norm, ModelHook())
    assert not {"func", "_ref"} & set(norm.forward.__dict__)
    # the signature it shows is the norm's (a copied signature carried the method's bound argument)
    assert inspect.signature(norm.forward) == want


def test_save_pretrained_round_trip(tmp_path):
    from transformers import LlavaForConditionalGeneration

    model = build("llava")
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    inputs = batch("llava")
    with torch.no_grad():
        ref = first_output(model(**inputs))
    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert not any(core.is_patched(m) for m in loaded.modules())
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys()
    for k in sd:
        assert torch.equal(sd[k].float(), lsd[k].float()), k
    mmfast.patch(loaded, verbose=False)
    with torch.no_grad():
        assert torch.equal(first_output(loaded(**inputs)), ref)


# ---------------------------------------------------------------------------------------------
# transformers' hub kernels (from_pretrained's use_kernels, kernelized again at each train() / eval())
# ---------------------------------------------------------------------------------------------

def _rms_norm_calls(model, inputs) -> int:
    with torch.no_grad(), mmfast.backends_used() as used:
        model(**inputs)
    return sum(n for use, n in used.items() if use.op == "rms_norm")


def test_patch_survives_hub_kernel_switches(tmp_path):
    """A model from ``from_pretrained`` has transformers' hub kernels on (``use_kernels``, its default where
    the kernels library is installed), and each switch of ``model.train()`` / ``eval()`` (HF Trainer makes
    one) kernelizes it again, which put the norm class's forward back in every patched RMSNorm: training
    then ran HF's norm (with fp32 master weights: in fp32, or a dtype error at the next matmul)."""
    from transformers import LlavaForConditionalGeneration

    build("llava").save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    if not model.use_kernels:
        pytest.skip("this transformers loads with hub kernels off (the kernels library is not installed)")
    report = mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    norms = [p for p in report.patched if report.kinds[p] == "rms_norm"]
    inputs = batch("llava")
    assert _rms_norm_calls(model, inputs) == len(norms) > 0
    for switch in (model.train, model.eval, model.train):
        switch()
        assert _rms_norm_calls(model, inputs) == len(norms), switch.__name__
        assert not any(core.displaced(m) for m in model.modules() if core.is_patched(m))
    mmfast.unpatch(model)
    model.eval()  # kernelized again: the unpatched norms are the hub kernels' to take once more
    assert _rms_norm_calls(model, inputs) == 0


def _hub_kernels() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if getattr(LlamaRMSNorm, "kernel_layer_name", None) is None:
        pytest.skip("the kernels library is not installed: transformers marks no layer for hub kernels")


class _HubRMSNorm(nn.Module):
    """What a hub kernel layer looks like to the model: kernelize binds its forward to the instance."""

    def forward(self, hidden_states):
        return hidden_states * 2.0


@pytest.mark.parametrize("put", ["hub kernel", "class forward"])
def test_patch_takes_the_place_of_a_hub_kernel(put):
    """A norm ``kernelize`` put a forward on (a hub kernel's, bound to the instance, beside the ``_kernel_repo``
    kernels 0.18+ records; or, before kernels 0.19, its class's own, bound) is patched, as its class's forward
    would be: mmfast.patch is the later, explicit ask. Before, every such norm was skipped as "forward already
    replaced", so on a GPU a model from ``from_pretrained`` got none of mmfast's norms. Unpatched, it runs its
    class's forward until transformers kernelizes it again."""
    _hub_kernels()
    model = build("llama")
    plain = copy.deepcopy(model)
    hub = model.model.layers[0].input_layernorm
    if put == "hub kernel":
        hub.forward = types.MethodType(_HubRMSNorm.forward, hub)
        hub.__dict__["_kernel_repo"] = "kernels-community/liger-kernels"
    else:
        hub.forward = types.MethodType(type(hub).forward, hub)
    report = mmfast.patch(model, verbose=False)
    assert "model.layers.0.input_layernorm" in report.patched and not report.skipped
    x = torch.randn(2, 3, hub.weight.numel())
    with mmfast.backends_used() as used:
        y = hub(x)
    assert sum(used.values()) == 1
    torch.testing.assert_close(y, plain.model.layers[0].input_layernorm(x))
    assert type(hub).kernel_condition(hub) is False  # kernelize leaves it to mmfast
    assert type(hub).kernel_condition(plain.model.layers[0].input_layernorm) is True
    assert "_kernel_repo" not in hub.__dict__
    mmfast.unpatch(model)
    assert "forward" not in hub.__dict__ and type(hub).kernel_condition(hub) is True


def test_a_hub_kernel_layer_patched_by_another_library_is_left_alone():
    """Liger's instance patching binds its forward to the norm as kernelize does, without ``_kernel_repo``:
    someone's explicit choice, left alone, and the reason says how to load without hub kernels should it be
    theirs (kernels 0.17 records no repository)."""
    _hub_kernels()
    model = build("llama")
    norm, other = model.model.layers[0].input_layernorm, model.model.layers[1].input_layernorm
    norm.forward = types.MethodType(_HubRMSNorm.forward, norm)
    other.__dict__["_kernel_repo"] = "kernels-community/liger-kernels"  # left by a hub kernel Liger replaced
    liger = _as_liger(_foreign_forward, "LigerRMSNorm.forward")
    other.forward = types.MethodType(liger, other)
    report = mmfast.patch(model, verbose=False)
    reason = dict(report.skipped)["model.layers.0.input_layernorm"]
    assert "does not stack" in reason and "use_kernels=False" in reason
    assert norm.__dict__["forward"].__func__ is _HubRMSNorm.forward
    assert "liger_kernel" in dict(report.skipped)["model.layers.1.input_layernorm"]
    assert other.__dict__["forward"].__func__ is liger


def test_patch_takes_the_place_of_a_hub_kernel_behind_an_accelerate_hook():
    """A model dispatched with ``device_map`` keeps its Accelerate hooks around what kernelize puts in the
    forward slot (``_old_forward``): a hub kernel there was reported as another library's forward and the
    norm skipped. It is patched behind the hook, and unpatched the hook runs the class's forward."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    _hub_kernels()
    model = build("llama")
    plain = copy.deepcopy(model)
    norm = model.model.norm
    add_hook_to_module(norm, ModelHook())
    norm._old_forward = types.MethodType(_HubRMSNorm.forward, norm)
    norm.__dict__["_kernel_repo"] = "kernels-community/liger-kernels"
    report = mmfast.patch(model, verbose=False)
    assert "model.norm" in report.patched and not report.skipped
    x = torch.randn(2, 3, norm.weight.numel())
    with mmfast.backends_used() as used:
        torch.testing.assert_close(norm(x), plain.model.norm(x))
    assert sum(used.values()) == 1
    mmfast.unpatch(model)
    assert norm._old_forward.__func__ is type(norm).forward and "_hf_hook" in norm.__dict__
    torch.testing.assert_close(norm(x), plain.model.norm(x))


def test_a_patched_model_unpickled_elsewhere_keeps_kernelize_off_its_norms(monkeypatch):
    """What keeps kernelize off patched norms sits on their class (``kernel_condition``), which a pickle does
    not carry: in a fresh process the unpickled model's next ``train()`` / ``eval()`` put the class's forward
    back. Unpickling a patched module puts it on the class again."""
    import pickle

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    _hub_kernels()
    model = build("llama")
    mmfast.patch(model, verbose=False)
    assert isinstance(LlamaRMSNorm.kernel_condition, core._LeavePatched)
    monkeypatch.setattr(LlamaRMSNorm, "kernel_condition", staticmethod(LlamaRMSNorm.kernel_condition.inner))
    assert not isinstance(LlamaRMSNorm.kernel_condition, core._LeavePatched)  # as a fresh process has it
    copy_ = pickle.loads(pickle.dumps(model))
    assert isinstance(LlamaRMSNorm.kernel_condition, core._LeavePatched)
    assert LlamaRMSNorm.kernel_condition(copy_.model.norm) is False


def test_patch_refuses_hub_kernels_it_cannot_keep_off(monkeypatch):
    """kernels before 0.17 has no ``kernel_condition``: in a model loaded with ``use_kernels``, the next
    ``train()`` / ``eval()`` would put the norms' own forward back over mmfast's. Refused before anything
    changes, with the way out."""
    _hub_kernels()
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.delattr(LlamaRMSNorm, "kernel_condition")
    model = build("llama")
    mmfast.patch(model, verbose=False)  # hub kernels off: nothing kernelizes the model again
    mmfast.unpatch(model)
    model._use_kernels = True
    with pytest.raises(ValueError, match=r"use_kernels=False.*kernels>=0\.17"):
        mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    assert not any(core.is_patched(m) for m in model.modules())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())


def test_patch_again_reports_a_forward_replaced_since():
    """A patched norm (or MLP) whose forward something replaced since is no longer counted as patched by a
    second ``mmfast.patch``: it is reported as someone else's, or patched again where its class's forward is back."""
    model = build("llama")
    mmfast.patch(model, verbose=False)
    norms = model.model.layers[0]
    norms.input_layernorm.forward = lambda hidden_states: hidden_states  # someone's own forward
    norms.post_attention_layernorm.__dict__.pop("forward")  # the class's forward back
    model.model.layers[1].mlp.forward = lambda x: x
    report = mmfast.patch(model, verbose=False)
    skipped = dict(report.skipped)
    assert report.mlps == ["model.layers.0.mlp"] and "already replaced" in skipped["model.layers.1.mlp"]
    assert "model.layers.0.input_layernorm" not in report.patched
    assert "already replaced" in skipped["model.layers.0.input_layernorm"]
    assert "model.layers.0.post_attention_layernorm" in report.patched
    assert not core.is_patched(norms.input_layernorm) and core.is_patched(norms.post_attention_layernorm)
    x = torch.randn(2, 3, norms.post_attention_layernorm.weight.numel())
    with mmfast.backends_used() as used:
        norms.post_attention_layernorm(x)
    assert sum(used.values()) == 1


# ---------------------------------------------------------------------------------------------
# what is not patched, and why
# ---------------------------------------------------------------------------------------------


def _llama_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm(16)


def _foreign_forward(self, x):
    return x


def _as_liger(fn, qualname: str, module: str = "liger_kernel.transformers.rms_norm"):
    """``fn`` dressed as Liger-Kernel's (what its instance patching binds to a module)."""
    fake = types.FunctionType(fn.__code__, fn.__globals__, "forward")
    fake.__module__, fake.__qualname__ = module, qualname
    return fake


def _liger_lce_forward(self, **kwargs):
    return type(self).forward(self, **kwargs)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "peft"])
def test_forwards_replaced_after_patch_warn_in_training(wrapped):
    """HF Trainer's and TRL's ``use_liger_kernel=True`` apply Liger-Kernel to the model at ``train()``, after
    mmfast.patch: its instance patching replaced every patched forward (norms, MLPs, the model's forward with
    the fused loss), mmfast's kernels stopped running, and nothing said so; a second patch then still reported
    the fused loss as on. A training forward warns once now, naming what replaced them, and a second patch
    reports every replaced module as someone else's, the fused loss included."""
    import warnings

    model = lora_llama(0, ["q_proj"]) if wrapped else build("llama")  # (PEFT: the fused loss is the forward)
    hf = model.get_base_model() if wrapped else model
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    assert core.is_patched(hf) == wrapped
    norm_fwd = _as_liger(_foreign_forward, "LigerRMSNorm.forward")
    for m in model.modules():
        if core.is_patched(m) and type(m).__name__ == "LlamaRMSNorm":
            m.forward = types.MethodType(norm_fwd, m)
            m.extra_repr = lambda: "liger"
    lce_forward = _as_liger(_liger_lce_forward, "lce_forward", "liger_kernel.transformers.model.llama")
    hf.forward = types.MethodType(lce_forward, hf)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.eval()
        with torch.no_grad():
            model(**batch("llama"))
        model.train()
        for _ in range(2):
            model(**batch("llama")).loss.backward()
    said = [str(w.message) for w in seen if "was replaced since" in str(w.message)]
    assert len(said) == 1
    assert "liger_kernel.transformers.rms_norm.LigerRMSNorm.forward" in said[0] and "use_liger_kernel" in said[0]
    report = mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    skipped = dict(report.skipped)
    assert not report.patched and all("liger_kernel" in skipped[p] for p in skipped if "norm" in p)
    assert report.fused_loss.startswith("not installed: model: forward already replaced on this instance by "
                                        "liger_kernel.transformers.model.llama.lce_forward")
    assert hf.model.norm.extra_repr() == "liger"  # Liger's own, left in place


@pytest.mark.parametrize("tuning", [None, "mma"])
def test_patch_again_after_accelerate_prepare_keeps_the_fused_loss(tuning):
    """``Accelerator.prepare``'s autocast wraps the model's forward (around its class's, or MMA's signature
    forward): a second patch took that for another library's forward and turned the fused loss off."""
    from accelerate import Accelerator

    model = build("llama")
    mmfast.patch(model, tuning=tuning, verbose=False)
    prepared = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
    report = mmfast.patch(prepared, tuning=tuning, verbose=False)
    assert report.fused_loss == "on"
    prepared.train()
    assert prepared(**batch("llama")).logits is None


def test_refuses_instance_patched_by_other_library():
    model = nn.Sequential(_llama_norm(), _llama_norm())
    fake = types.FunctionType(_foreign_forward.__code__, {}, "forward")
    fake.__module__ = "liger_kernel.transformers.rms_norm"
    fake.__qualname__ = "LigerRMSNorm.forward"
    model[0].forward = types.MethodType(fake, model[0])
    report = mmfast.patch(model, verbose=False)
    assert report.patched == ["1"]
    (path, reason), = report.skipped
    assert path == "0" and "liger_kernel" in reason and "does not stack" in reason
    assert model[0].__dict__["forward"].__func__ is fake


def test_refuses_class_from_other_library():
    Liger = type("LigerRMSNorm", (nn.Module,), {"forward": lambda self, x: x, "__module__": "liger_kernel.transformers.rms_norm"})
    model = nn.Sequential(Liger(), nn.LayerNorm(8))
    report = mmfast.patch(model, verbose=False)
    assert report.patched == ["1"]
    assert report.skipped[0][0] == "0" and "liger_kernel" in report.skipped[0][1]


def test_refuses_globally_replaced_class_forward(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    fake = types.FunctionType(_foreign_forward.__code__, {}, "forward")
    fake.__module__ = "unsloth.kernels.rms_layernorm"
    monkeypatch.setattr(LlamaRMSNorm, "forward", fake)
    report = mmfast.patch(nn.Sequential(LlamaRMSNorm(8)), verbose=False)
    assert not report.patched and "unsloth" in report.skipped[0][1]


def test_skips_other_semantics_with_reason():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    model = nn.Sequential(GemmaRMSNorm(8), nn.LayerNorm((4, 8)), nn.GroupNorm(2, 8), _llama_norm())
    report = mmfast.patch(model, verbose=False)
    assert report.patched == ["3"]
    reasons = dict(report.skipped)
    assert "(1 + weight)" in reasons["0"]
    assert "2 dimensions" in reasons["1"]
    assert "GroupNorm" in reasons["2"]


def test_a_norm_whose_forward_differs_in_a_constant_alone_is_skipped():
    """The family match compares the forward's code with its constants: a class whose forward is LLaMA's
    bytecode but another power (a mean of |x|^3, say) computes something else, and is skipped with the
    reason, not given the fused RMSNorm. Llama 4's match compares ``_norm`` too: a class with its forward
    but another ``_norm`` is skipped the same way."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.llama4.modeling_llama4 import Llama4TextRMSNorm

    code = LlamaRMSNorm.forward.__code__
    assert code.co_consts.count(2) == 1  # the power of x.pow(2)
    cubed = code.replace(co_consts=tuple(3 if c == 2 and type(c) is int else c for c in code.co_consts))
    forward = types.FunctionType(cubed, LlamaRMSNorm.forward.__globals__, "forward")
    forward.__module__ = __name__
    Cubed = type("CubedRMSNorm", (LlamaRMSNorm,), {"forward": forward})

    class MeanAbsNorm(Llama4TextRMSNorm):
        def _norm(self, x):
            return x / (x.abs().mean(-1, keepdim=True) + self.variance_epsilon)

    model = nn.Sequential(Cubed(16), MeanAbsNorm(16), LlamaRMSNorm(16), Llama4TextRMSNorm(16))
    report = mmfast.patch(model, verbose=False)
    assert report.patched == ["2", "3"]
    reasons = dict(report.skipped)
    assert "CubedRMSNorm" in reasons["0"] and "MeanAbsNorm" in reasons["1"]


def _llama_forward_with(change: str):
    """LlamaRMSNorm's forward with one part of its code changed, the rest of its key (:func:`table._code_key`) as
    LLaMA's: "name" (torch.sqrt where it calls torch.rsqrt: the same bytecode and constants), "operation" (its
    input divided by rsqrt(...), not multiplied: the same names and constants), "argument" (its input named
    ``x``: the same computation, but a call by keyword names it), "docstring" (LLaMA's code under a docstring of
    its own)."""
    import dis

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    llama = LlamaRMSNorm.forward
    code = llama.__code__
    if change == "name":
        assert code.co_names.count("rsqrt") == 1
        code = code.replace(co_names=tuple("sqrt" if n == "rsqrt" else n for n in code.co_names))
    elif change == "argument":
        assert code.co_varnames[:2] == ("self", "hidden_states")
        code = code.replace(co_varnames=("self", "x") + code.co_varnames[2:])
    elif change == "operation":  # the first product (hidden_states * torch.rsqrt(...)) made a division
        raw = bytearray(code.co_code)
        first = next(i for i in dis.get_instructions(code) if i.opname == "BINARY_MULTIPLY"
                     or i.opname == "BINARY_OP" and i.argrepr == "*")
        if first.opname == "BINARY_OP":  # (Python 3.11+: one opcode, the operation its argument)
            raw[first.offset + 1] = [sym for _, sym in dis._nb_ops].index("/")
        else:
            raw[first.offset] = dis.opmap["BINARY_TRUE_DIVIDE"]
        code = code.replace(co_code=bytes(raw))
    else:
        if getattr(inspect, "CO_HAS_DOCSTRING", None) is not None:
            pytest.skip("Python 3.14 keeps a docstring in a flag beside the constants: no code to add one to here")
        assert code.co_consts[0] is None  # (before 3.14: const 0 is the docstring, None where there is none)
        code = code.replace(co_consts=("The mean square of the row, normalised in fp32.",) + code.co_consts[1:])
    forward = types.FunctionType(code, llama.__globals__, "forward")  # (code.replace: the rest is LLaMA's)
    forward.__module__ = __name__  # (the module of the classes made here: a class's own forward)
    return forward


@pytest.mark.parametrize("change", ["name", "operation", "argument"])
def test_a_norm_whose_forward_differs_in_a_name_an_operation_or_an_argument_is_skipped(change):
    """The family match compares the forward's whole code (bytecode, the names it calls, its argument names),
    not one part: a class with LLaMA's forward but another function called (sqrt for rsqrt) or another
    operation (a division for the product) computes something else, and one whose input is named otherwise
    is called by that name (a fused forward given ``x=`` raised a TypeError). Each is left to its own forward
    and reported, and computes what it did unpatched."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    Variant = type(f"Variant{change.title()}RMSNorm", (LlamaRMSNorm,), {"forward": _llama_forward_with(change)})
    torch.manual_seed(0)
    model = nn.Sequential(Variant(16), LlamaRMSNorm(16))
    with torch.no_grad():
        for norm in model:
            norm.weight.normal_(1.0, 0.3)
    plain = copy.deepcopy(model)
    report = mmfast.patch(model, verbose=False)
    assert report.patched == ["1"] and Variant.__name__ in dict(report.skipped)["0"]
    x = torch.randn(3, 16)
    with torch.no_grad():
        if change == "argument":
            assert torch.equal(model[0](x=x), plain[0](x=x))
        assert torch.equal(model[0](x), plain[0](x))


def test_a_norm_with_llamas_forward_under_a_docstring_of_its_own_is_patched(seed, monkeypatch):
    """A norm class whose forward is LLaMA's code under a docstring of its own (LLaMA's has none) computes
    LLaMA's norm: it is patched, and its output is as accurate as PyTorch's bf16 against float64."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from accuracy import assert_accurate

    Documented = type("DocumentedRMSNorm", (LlamaRMSNorm,), {"forward": _llama_forward_with("docstring")})
    assert Documented.forward.__doc__ and not LlamaRMSNorm.forward.__doc__
    torch.manual_seed(seed)
    norm = Documented(64, eps=1e-3)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    norm = norm.to(torch.bfloat16)
    ref, lowp = copy.deepcopy(norm).double(), copy.deepcopy(norm)
    assert mmfast.patch(nn.Sequential(norm), verbose=False).patched == ["0"]
    calls = count_calls(monkeypatch, nn_norm, "rms_norm")
    x = torch.randn(4, 7, 64).to(torch.bfloat16)
    with torch.no_grad(), float64_norms(ref):  # (HF's RMSNorm would normalise the float64 oracle in fp32)
        y, y_lowp, y_ref = norm(x), lowp(x), ref(x.double())
    assert len(calls) == 1
    assert_accurate("y", y, y_lowp, y_ref, y_ref.abs().max().item(), seed)


def test_a_norm_with_llama4s_norm_but_another_forward_is_skipped():
    """Llama 4's match compares ``forward`` as well as ``_norm``: a class with its ``_norm`` but a forward that
    scales by (1 + weight) computes something else, and is left to its own forward."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextRMSNorm

    class OnePlusNorm(Llama4TextRMSNorm):
        def forward(self, x):
            output = self._norm(x.float()).type_as(x)
            return output * (1.0 + self.weight)

    model = nn.Sequential(OnePlusNorm(16), Llama4TextRMSNorm(16))
    plain = copy.deepcopy(model)
    report = mmfast.patch(model, verbose=False)
    assert report.patched == ["1"] and "OnePlusNorm" in dict(report.skipped)["0"]
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(model[0](x), plain[0](x))


def test_rms_norms_whose_weight_the_kernels_do_not_take_are_skipped():
    """An RMSNorm with a 2-D weight (LLaMA's forward broadcasts it over the last two dimensions) is left to its
    own forward, which it computes as unpatched (the fused op raised, wanting a weight of one row). A ZeRO-3
    partition's width is its full shape (``ds_shape``), not the empty partition's: one wider than MAX_N is
    skipped (meta device, stand-in attributes of a partitioned parameter)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from mmfast.ops.norm import MAX_N

    torch.manual_seed(0)
    grid = LlamaRMSNorm((4, 8))
    with torch.no_grad():
        grid.weight.normal_(1.0, 0.3)
    plain = copy.deepcopy(grid)
    report = mmfast.patch(nn.Sequential(grid), verbose=False)
    assert not report.patched and dict(report.skipped)["0"] == "weight is not a 1-D parameter"
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        assert torch.equal(grid(x), plain(x))

    with torch.device("meta"):
        model = nn.Sequential(LlamaRMSNorm(MAX_N + 1), LlamaRMSNorm(MAX_N))
    for norm in model:  # partitioned: an empty local tensor, the full shape in ds_shape
        w = norm.weight
        w.ds_id, w.ds_shape, w.ds_numel = id(w), tuple(w.shape), w.numel()
        w.data = torch.empty(0, device="meta")
    report = mmfast.patch(model, verbose=False)
    assert report.patched == ["1"] and dict(report.skipped)["0"] == f"width {MAX_N + 1} above the supported {MAX_N}"


def test_layer_norm_subclasses_are_patched_only_with_torchs_forward():
    """A LayerNorm subclass that keeps torch's forward computes LayerNorm and is patched (it runs the fused
    op); one with a forward of its own (here over the channels of a channels-first input) is left to it."""

    class KeptLayerNorm(nn.LayerNorm):
        pass

    class ChannelsFirstLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.transpose(1, -1)).transpose(1, -1)

    torch.manual_seed(0)
    model = nn.Sequential(KeptLayerNorm(8), ChannelsFirstLayerNorm(8))
    with torch.no_grad():
        for norm in model:
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
    plain = copy.deepcopy(model)
    report = mmfast.patch(model, verbose=False)
    assert report.patched == ["0"] and "ChannelsFirstLayerNorm" in dict(report.skipped)["1"]
    x = torch.randn(2, 8, 5, 8)
    with torch.no_grad():
        assert torch.equal(model[1](x), plain[1](x))
        torch.testing.assert_close(model[0](x), plain[0](x))


def test_norms_wider_than_the_kernels_take_are_skipped_with_the_reason():
    """A norm wider than the fused kernels' MAX_N is left to its own forward and reported, RMSNorm and
    LayerNorm alike; one exactly MAX_N wide is patched (meta device: no memory)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from mmfast.ops.norm import MAX_N

    with torch.device("meta"):
        model = nn.Sequential(LlamaRMSNorm(MAX_N + 1), nn.LayerNorm(MAX_N + 1), LlamaRMSNorm(MAX_N), nn.LayerNorm(MAX_N))
    report = mmfast.patch(model, verbose=False)
    assert report.patched == ["2", "3"]
    reasons = dict(report.skipped)
    assert f"width {MAX_N + 1} above the supported {MAX_N}" == reasons["0"] == reasons["1"]


@pytest.mark.parametrize("cls", ["LlamaRMSNorm", "Llama4TextRMSNorm", "LayerNorm"])
def test_rms_norm_takes_the_modules_own_epsilon(cls, seed):
    """The fused RMSNorm uses the module's epsilon (``variance_epsilon``), not a default, and the fused
    LayerNorm its ``eps`` (not LayerNorm's default 1e-5, which the tiny models' configs keep): with an
    epsilon comparable to the rows' mean square (variance), the output is as accurate as PyTorch's bf16
    against float64."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.llama4.modeling_llama4 import Llama4TextRMSNorm

    from accuracy import assert_accurate

    torch.manual_seed(seed)
    norm = {"LlamaRMSNorm": LlamaRMSNorm, "Llama4TextRMSNorm": Llama4TextRMSNorm, "LayerNorm": nn.LayerNorm}[cls](
        64, eps=0.25)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        if cls == "LayerNorm":
            norm.bias.normal_(0.0, 0.3)
    norm = norm.to(torch.bfloat16)
    ref, lowp = copy.deepcopy(norm).double(), copy.deepcopy(norm)
    mmfast.patch(norm, verbose=False)
    x = (0.3 * torch.randn(4, 7, 64)).to(torch.bfloat16)  # mean square (variance) ~0.09: eps 0.25 dominates
    with torch.no_grad(), float64_norms(ref):  # (HF's RMSNorm would normalise the float64 oracle in fp32)
        y, y_lowp, y_ref = norm(x), lowp(x), ref(x.double())
    assert_accurate("y", y, y_lowp, y_ref, y_ref.abs().max().item(), seed)


def test_layer_norm_without_affine_and_bias():
    model = nn.Sequential(nn.LayerNorm(32, elementwise_affine=False), nn.LayerNorm(32, bias=False))
    x = torch.randn(3, 32)
    with torch.no_grad():
        ref = model(x)
    report = mmfast.patch(model, verbose=False)
    assert report.patched == ["0", "1"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def test_layer_norm_of_another_width_raises_as_unpatched():
    """A LayerNorm given rows of another width: PyTorch raises. With no weight (elementwise_affine=False) the
    patched forward normalised over the rows' width instead and returned them, without a word; with one it
    raised a ValueError about the weight. Both raise PyTorch's error now."""
    model = nn.Sequential(nn.LayerNorm(8, elementwise_affine=False), nn.LayerNorm(8, bias=False), nn.LayerNorm(8))
    x = torch.randn(2, 16)
    said = []
    for norm in model:
        with pytest.raises(RuntimeError) as e:
            norm(x)
        said.append(str(e.value))
    assert mmfast.patch(model, verbose=False).patched == ["0", "1", "2"]
    for norm, text in zip(model, said):
        with pytest.raises(RuntimeError) as e:
            norm(x)
        assert str(e.value) == text


def test_accelerate_hook_kept():
    """A module behind an Accelerate hook: the hook keeps running and wraps the fused forward."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        n = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.n += 1
            return args, kwargs

    norm = _llama_norm()
    add_hook_to_module(norm, Count())
    x = torch.randn(2, 16)
    ref = norm(x)
    report = mmfast.patch(nn.Sequential(norm), verbose=False)
    assert report.patched == ["0"]
    assert core.binding_of(norm.__dict__["_old_forward"]) is not None
    before = Count.n
    torch.testing.assert_close(norm(x), ref)
    assert Count.n == before + 1
    mmfast.unpatch(norm)
    assert norm.__dict__["_old_forward"].__func__ is type(norm).forward


def test_unpatch_keeps_an_accelerate_hook_added_after_patching(monkeypatch):
    """patch, then ``cpu_offload`` (an AlignDevicesHook per module, weights on meta, loaded at forward),
    then unpatch: unpatch took the hook's forward for the patched one and dropped it, and the model
    failed on meta weights. The hooks stay now, around the original forwards."""
    from accelerate import cpu_offload

    model = build("llama")
    inputs = {k: v for k, v in batch("llama").items() if k != "labels"}
    with torch.no_grad():
        ref = model(**inputs).logits
    mmfast.patch(model, verbose=False)
    with torch.no_grad():
        patched = model(**inputs).logits
    cpu_offload(model, execution_device="cpu")
    norm = model.model.layers[0].input_layernorm
    assert norm.weight.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, patched)
    mmfast.unpatch(model)
    assert "_hf_hook" in norm.__dict__ and core.binding_of(norm.__dict__["_old_forward"]) is None
    assert core.binding_of(norm.forward.__wrapped__) is None
    calls = count_calls(monkeypatch, nn_norm, "rms_norm")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    assert not calls, "a fused norm ran after unpatch"


def test_unpatch_after_the_hook_it_was_put_behind_was_removed():
    """A hook, patch (behind it), the hook removed (PEFT's from_pretrained on offloaded models), unpatch:
    the module was left with the patched forward and no record (KeyError on every call)."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    norm = _llama_norm()
    x = torch.randn(2, 16)
    ref = norm(x)
    add_hook_to_module(norm, ModelHook())
    mmfast.patch(nn.Sequential(norm), verbose=False)
    remove_hook_from_module(norm)
    torch.testing.assert_close(norm(x), ref)
    mmfast.unpatch(norm)
    assert "forward" not in norm.__dict__ and "_old_forward" not in norm.__dict__
    torch.testing.assert_close(norm(x), ref)
    add_hook_to_module(norm, ModelHook())  # and a hook again: around the class's forward
    mmfast.patch(nn.Sequential(norm), verbose=False)
    assert core.is_patched(norm)


def test_unpatch_keeps_accelerate_prepares_autocast():
    """patch, ``Accelerator(mixed_precision="bf16").prepare``, unpatch: prepare wraps the model's (patched)
    forward in autocast; unpatch removed that wrapper with the patched forward, and the model ran in fp32
    without a word. The wrapper stays, and the forward it holds runs the original."""
    from accelerate import Accelerator

    model = build("llama")
    inputs = {k: v for k, v in batch("llama").items() if k != "labels"}
    mmfast.patch(model, verbose=False)
    model = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    mmfast.unpatch(model)
    assert not core.is_patched(model)
    with torch.no_grad():
        model(**inputs)
    assert seen == [torch.bfloat16]


def test_unpatch_a_record_from_before_records_kept_their_forward():
    """A patched model pickled by an earlier mmfast: its records have no ``forward``; unpatch takes the
    one in the record's slot (it left it there, and every call then failed on the missing record)."""
    norm = _llama_norm()
    x = torch.randn(2, 16)
    ref = norm(x)
    mmfast.patch(nn.Sequential(norm), verbose=False)
    norm.__dict__[core._ATTR].forward = None
    mmfast.unpatch(norm)
    assert "forward" not in norm.__dict__ and "_old_forward" not in norm.__dict__
    torch.testing.assert_close(norm(x), ref, rtol=0, atol=0)


def test_a_patched_forward_held_elsewhere_runs_the_original_after_unpatch(monkeypatch):
    norm = _llama_norm()
    x = torch.randn(2, 16)
    ref = norm(x)
    mmfast.patch(nn.Sequential(norm), verbose=False)
    held = norm.forward
    mmfast.unpatch(norm)
    calls = count_calls(monkeypatch, nn_norm, "rms_norm")
    torch.testing.assert_close(held(x), ref)
    assert not calls
    assert list(inspect.signature(held).parameters) == list(inspect.signature(norm.forward).parameters)


# ---------------------------------------------------------------------------------------------
# compile and PEFT
# ---------------------------------------------------------------------------------------------


# the patched forwards keep Python work Dynamo would have to trace out of the compiled path (a signature
# lookup through an lru_cache'd helper warned on every compile)
@pytest.mark.filterwarnings("error:Dynamo detected a call to a .functools.lru_cache")
def test_compile_fullgraph_patched_llama():
    torch._dynamo.reset()
    model = build("llama")
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    inputs = batch("llama")
    with torch.no_grad():
        eager_logits = model(**inputs).logits
    eager_loss = model(**inputs).loss  # the fused LM-head loss, compiled or not
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, eager_logits)
    out = compiled(**inputs)
    assert out.logits is None
    torch.testing.assert_close(out.loss, eager_loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager_grads.keys() and len(grads) == 2 * 2
    for n in grads:
        torch.testing.assert_close(grads[n], eager_grads[n])


def test_disabled_switches_compiled_model_at_run_time(monkeypatch):
    """``mmfast.disabled()`` is read through a module global, which Dynamo guards: a compiled patched
    model recompiles to the original forwards inside the block and back to the fused ops after it."""
    torch._dynamo.reset()
    model = build("llama")
    inputs = batch("llama")
    with torch.no_grad():
        expected = first_output(model(**inputs))
    mmfast.patch(model, fused_loss=False, verbose=False)
    calls = count_calls(monkeypatch, nn_norm, "rms_norm")
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(**inputs)
        assert calls, "the compiled patched model did not trace the fused op"
        calls.clear()
        with mmfast.disabled():
            out = first_output(compiled(**inputs))
        assert not calls and torch.equal(out, expected)
        compiled(**inputs)
        assert calls, "leaving disabled() did not bring the fused op back"


def test_peft_lora_model(seed):
    ref = lora_llama(seed, ["q_proj", "v_proj"])
    peft_model = copy.deepcopy(ref)
    report = mmfast.patch(peft_model, verbose=False)
    assert any(p.startswith("base_model.model.model.layers.0") for p in report.patched)
    assert report.fused_loss == "on" and peft_model(**batch("llama", seed)).logits is None
    ours, lowp, ref64 = draw(peft_model, ref, copy.deepcopy(ref).double(), batch("llama", seed))
    assert ours[2].keys() == lowp[2].keys() and all("lora_" in n for n in ours[2])
    assert_model_accurate(ours, lowp, ref64, seed)


@pytest.mark.parametrize("tuning", [None, "layernorm"])
def test_layers_compiled_one_by_one_share_their_code(tuning):
    """Each decoder layer compiled on its own (``layer.compile()``, Accelerate's regional compilation): the
    patched forwards, callable objects, were guarded by identity, so every layer compiled again, and past
    torch.compile's recompile limit (8) the other layers ran uncompiled, silently. They are methods whose
    function's code all layers share now: one compile, as unpatched."""
    from transformers import LlamaForCausalLM
    from tiny_models import llama_config

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(num_hidden_layers=10))
    mmfast.patch(model, tuning=tuning, verbose=False)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    inputs = batch("llama")
    ref = model(**inputs, use_cache=False).loss
    for layer in model.model.layers:
        layer.compile(backend=backend)
    try:
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1 and torch.allclose(loss, ref)


def test_norms_given_hooks_of_their_own_after_patching_get_forwards_compile_tells_apart():
    """Hooks the user put on patched norms after mmfast.patch (per-layer state torch.compile does not guard):
    a patch again gives those norms forwards that torch.compile guards per module (a method forward, guarded
    by the code every layer shares, let compiled code traced through one layer's hook run for the next);
    norms without hooks keep method forwards."""
    model = build("llama")
    mmfast.patch(model, verbose=False)
    for i, layer in enumerate(model.model.layers):
        layer.input_layernorm.register_forward_hook(lambda m, args, out, s=float(i + 2): out * s)
    mmfast.patch(model, verbose=False)
    for layer in model.model.layers:
        assert isinstance(layer.input_layernorm.forward, core._PatchedForward)
        assert isinstance(layer.post_attention_layernorm.forward, types.MethodType)


# ---------------------------------------------------------------------------------------------
# export and tracing of a patched model
# ---------------------------------------------------------------------------------------------

def test_export_non_strict_of_a_model_whose_top_forward_mmfast_replaced():
    """``torch.export.export``'s default (non-strict) reads ``model.forward.__code__`` to name its shape
    environment; where mmfast's forward on the model's top module is a callable object (MMA's, which shows
    ``mma_has_image`` in the signature) it raised AttributeError. The exported program runs mmfast's ops."""
    model = build("llama")
    mmfast.patch(model, tuning="mma", verbose=False)
    model.eval()
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ep = torch.export.export(model, (), {"input_ids": ids, "use_cache": False})
        assert any(str(n.target).startswith("mmfast.") for n in ep.graph.nodes if n.op == "call_function")
        torch.testing.assert_close(ep.module()(input_ids=ids, use_cache=False)["logits"],
                                   model(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_jit_trace_records_mmfast_ops(backend, device):
    """Under ``torch.jit.trace`` the eager fast path ran with traced sizes, and the Triton launcher failed on
    them ('Tensor' object has no attribute 'bit_length'); without Triton the trace missed the output's
    allocation and the traced module failed on every input. The trace records the custom ops, and runs
    right on another shape."""
    model = build("llama").to(device)  # (a GPU machine runs the Triton kernels on CUDA tensors only)
    mmfast.patch(model, verbose=False)
    block = nn.Sequential(model.model.layers[0].input_layernorm, model.model.layers[0].mlp)
    x = torch.randn(2, 5, block[0].weight.numel(), device=device)
    with torch.no_grad(), mmfast.use_backend(backend):
        traced = torch.jit.trace(block, (x,))
        assert "mmfast::rms_norm_fwd" in str(traced.inlined_graph)
        assert "mmfast::swiglu" in str(traced.inlined_graph)
        y = torch.randn(3, 7, x.shape[-1], device=device)
        torch.testing.assert_close(traced(y), block(y), rtol=0, atol=0)


def test_jit_script_of_a_patched_module_is_refused_clearly():
    """TorchScript compiles a forward from its source and failed on a patched one with a TypeError about
    mmfast's internals; it is refused with the way out, and the unpatched module scripts."""
    model = build("clip-vision")
    mmfast.patch(model, verbose=False)
    norm = model.post_layernorm
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile a patched module \(LayerNorm\).*unpatch"):
        torch.jit.script(norm)
    mmfast.unpatch(model)
    x = torch.randn(2, 3, norm.weight.numel())
    torch.testing.assert_close(torch.jit.script(norm)(x), norm(x))


def test_import_loads_neither_dynamo_nor_transformers():
    """``import mmfast`` made a function ``torch.compiler.disable`` at import, which imports Dynamo (and
    Triton through it): two seconds of every import, before any model was patched. Dynamo and transformers
    load when something needs them."""
    import subprocess
    import sys

    code = "import sys, mmfast; print(sorted(m for m in ('torch._dynamo', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
