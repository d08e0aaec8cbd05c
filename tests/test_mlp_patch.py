"""Fused MLP activations in patched models (mmfast.patching.mlp): the SwiGLU gate of LLaMA MLPs and
CLIP's QuickGELU; which MLPs take them, accuracy at model level (rule: model_accuracy.py), LoRA on the
projections, opt-out, unpatch, disable, foreign patches."""

import copy
import functools

import pytest
import torch

import mmfast
from model_accuracy import assert_model_accurate, assert_model_accurate_over_draws, draw
from spy import as_from
from tiny_models import batch, build, llama_config, lora_llama


def _llama(seed, dtype=torch.float32, **cfg):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**cfg)).to(dtype)


#: Independent draws pooled in the low-precision model checks (model_accuracy.assert_model_accurate_over_draws:
#: the fused gate rounds once where PyTorch rounds twice, so the two losses' errors are different samples).
DRAWS = 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_llama_mlps_take_the_fused_gate(dtype, seed):
    model = build("llama", seed, dtype=dtype)
    ref_model = copy.deepcopy(model).double()
    plain = copy.deepcopy(model)
    report = mmfast.patch(model, fused_loss=False, verbose=False)
    assert report.mlps == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert "fused MLP activations: 2 MLPs, 2 swiglu" in report.summary() and "layers.*.mlp" in str(report)
    assert "mmfast=swiglu" in repr(model.model.layers[0].mlp)
    assert not report.skipped
    draws = []
    # bf16: 8 draws failed 1 seed in 18 (a max of 8 losses against a max of 8); 24, as CLIP's below
    for i in range(DRAWS if dtype == torch.float32 else 3 * DRAWS):
        inputs = batch("llama", seed + i)
        draws.append(draw(model, plain, ref_model, inputs))
    assert_model_accurate_over_draws(draws, seed)


def test_llava_mlps_of_both_towers(seed):
    model = build("llava", seed)
    report = mmfast.patch(model, verbose=False)
    clip = [f"model.vision_tower.encoder.layers.{i}.mlp" for i in range(2)]
    llama = [f"model.language_model.layers.{i}.mlp" for i in range(2)]
    assert sorted(report.mlps) == sorted(clip + llama)
    assert {report.kinds[p] for p in clip} == {"quick_gelu"} and {report.kinds[p] for p in llama} == {"swiglu"}
    assert "4 MLPs, 2 quick_gelu, 2 swiglu" in report.summary()
    assert "mmfast=quick_gelu" in repr(model.model.vision_tower.encoder.layers[0].mlp)
    mmfast.unpatch(model)  # both families' forwards restored
    assert not any("forward" in vars(model.get_submodule(p)) for p in clip + llama)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_clip_mlps_take_the_fused_quick_gelu(dtype, seed):
    model = build("clip-vision", seed, dtype=dtype)
    ref_model = copy.deepcopy(model).double()
    plain = copy.deepcopy(model)
    report = mmfast.patch(model, verbose=False)
    assert report.mlps == [f"encoder.layers.{i}.mlp" for i in range(2)]
    assert {report.kinds[p] for p in report.mlps} == {"quick_gelu"} and not report.skipped
    # a loss is one number per draw: the tiny CLIP's bf16 losses need more draws than the LLaMA's before
    # the max-error comparison stops being a coin toss (8 draws failed 1 seed in 12; 24 failed none)
    draws = [draw(model, plain, ref_model, batch("clip-vision", seed + i)) for i in range(3 * DRAWS)]
    assert_model_accurate_over_draws(draws, seed)


def test_clip_with_another_activation_is_skipped_with_the_reason(seed):
    from transformers import CLIPVisionModel

    from tiny_models import clip_vision_config

    torch.manual_seed(seed)
    model = CLIPVisionModel(clip_vision_config(hidden_act="gelu"))
    report = mmfast.patch(model, verbose=False)
    assert report.mlps == []
    assert "not QuickGELU" in dict(report.skipped)["encoder.layers.0.mlp"]


def test_lora_on_the_projections(seed):
    """LoRA on gate / up / down: the patched MLP calls the module's own (wrapped) projections, so the
    adapters train; gradients match the unpatched model by the accuracy rule."""
    ref = lora_llama(seed, ["gate_proj", "up_proj", "down_proj"])
    ours = copy.deepcopy(ref)
    report = mmfast.patch(ours, fused_loss=False, verbose=False)
    assert report.mlps == [f"base_model.model.model.layers.{i}.mlp" for i in range(2)]
    got, lowp, ref64 = draw(ours, ref, copy.deepcopy(ref).double(), batch("llama", seed))
    assert got[2].keys() == lowp[2].keys() and any("mlp.down_proj.lora_A" in n for n in got[2])
    assert_model_accurate(got, lowp, ref64, seed)


def test_other_activation_is_skipped_with_the_reason(seed):
    model = _llama(seed, hidden_act="gelu")
    report = mmfast.patch(model, verbose=False)
    assert report.mlps == []
    reasons = dict(report.skipped)
    assert "not SiLU" in reasons["model.layers.0.mlp"] and "forward" not in vars(model.model.layers[0].mlp)


def test_swish_config_is_silu(seed):
    assert mmfast.patch(_llama(seed, hidden_act="swish"), verbose=False).mlps == ["model.layers.0.mlp",
                                                                                   "model.layers.1.mlp"]


def test_opt_out_unpatch_and_disable(seed):
    model = build("llama", seed)
    inputs = {"input_ids": batch("llama", seed)["input_ids"]}
    with torch.no_grad():
        want = model(**inputs).logits
    mlp = model.model.layers[0].mlp

    report = mmfast.patch(model, fused_mlp=False, verbose=False)
    assert report.mlps is None and "fused MLP activations: off" in report.summary() and "forward" not in vars(mlp)

    assert mmfast.patch(model, verbose=False).mlps and "forward" in vars(mlp)
    with mmfast.disabled(), torch.no_grad():
        assert torch.equal(model(**inputs).logits, want)  # the original forwards, bit for bit
    assert mmfast.patch(model, verbose=False).mlps == ["model.layers.0.mlp", "model.layers.1.mlp"]  # idempotent

    mmfast.patch(model, fused_mlp=False, verbose=False)  # a later call without it takes it out
    assert "forward" not in vars(mlp)
    mmfast.patch(model, verbose=False)
    mmfast.unpatch(model)
    assert all("forward" not in vars(m) and "extra_repr" not in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, want)


def test_foreign_forward_is_left_alone(seed):
    model = build("llama", seed)
    mlp = model.model.layers[1].mlp
    mlp.forward = functools.partial(type(mlp).forward, mlp)
    theirs = mlp.forward
    report = mmfast.patch(model, verbose=False)
    assert report.mlps == ["model.layers.0.mlp"]
    assert "already replaced" in dict(report.skipped)["model.layers.1.mlp"] and mlp.forward is theirs


def test_projections_in_different_dtypes_meet_in_the_promoted_one(seed):
    """A gate projection in fp32 beside a bf16 up projection: the product is taken in fp32, as the unfused
    ``act_fn(gate) * up`` would promote it (not a dtype error)."""
    from torch import nn

    from mmfast.nn.mlp import llama_mlp_forward

    class Bf16Out(nn.Linear):
        def forward(self, x):
            return super().forward(x).bfloat16()

    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(8, 16), Bf16Out(8, 16), nn.Identity()
    x = torch.randn(3, 8)
    got = llama_mlp_forward(mlp, x)
    g, u = mlp.gate_proj(x), mlp.up_proj(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.nn.functional.silu(g) * u.float())


def test_clip_mlp_called_with_its_keyword(seed):
    """The patched CLIP MLP takes its input by the class forward's parameter name, as its advertised
    signature says (it raised TypeError: the fused forward named it differently)."""
    model = build("clip-vision", seed)
    mlp = model.encoder.layers[0].mlp
    x = torch.randn(2, 5, model.config.hidden_size)
    with mmfast.disabled():
        want = mlp(hidden_states=x)
    mmfast.patch(model, verbose=False)
    assert mmfast.patching.core.is_patched(mlp)
    torch.testing.assert_close(mlp(hidden_states=x), want)


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_hooks_on_the_activation_run(kind, seed, recwarn):
    """A hook on the activation module of a patched MLP runs, and what it returns counts: registered
    after patching, the MLP runs its original forward with one warning; registered before, the MLP is
    not patched and the report says why (the fused kernel never called the module: hooks were skipped).
    The patched model runs fused once before the hook is registered: the per-call check's fast path then
    holds, and it must see the hook too (it passed only when no earlier test had run an MLP fused)."""
    def make():
        m = _llama(seed)
        return m, m.model.layers[0].mlp

    calls = []

    def register(mlp):
        if kind == "forward":
            return mlp.act_fn.register_forward_hook(lambda mod, inp, out: calls.append(1) or out * 2)
        if kind == "forward_pre":
            return mlp.act_fn.register_forward_pre_hook(lambda mod, inp: calls.append(1) or (inp[0] * 2,))
        return mlp.act_fn.register_full_backward_hook(lambda mod, gi, go: calls.append(1))

    ids = torch.randint(0, 64, (2, 6))
    plain, pmlp = make()
    register(pmlp)
    want = plain(input_ids=ids).logits
    want.sum().backward()
    n_plain = len(calls)
    assert n_plain == 1

    after, amlp = make()
    mmfast.patch(after, fused_loss=False, verbose=False)
    after(input_ids=ids)  # fused: the per-call check remembers the type (and must still see the new hook)
    calls.clear()
    register(amlp)
    with pytest.warns(RuntimeWarning, match="runs its original forward: a .*hook on act_fn"):
        got = after(input_ids=ids).logits
    got.sum().backward()
    assert len(calls) == n_plain
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(amlp.gate_proj.weight.grad, pmlp.gate_proj.weight.grad)

    before, bmlp = make()
    register(bmlp)
    report = mmfast.patch(before, fused_loss=False, verbose=False)
    assert "model.layers.0.mlp" not in report.mlps and "model.layers.1.mlp" in report.mlps
    assert any(p == "model.layers.0.mlp" and "hook on act_fn" in why for p, why in report.skipped)


@pytest.mark.parametrize("other", ["module", "function"])
def test_activation_replaced_after_patching(other, seed, monkeypatch):
    """An activation swapped after patching computes (the fused SiLU kept running before), a module or a
    plain function put in its place (the fast check raised TypeError on a function)."""
    import torch.nn.functional as F

    monkeypatch.setattr("mmfast.ops.backend._warned", set())  # the warning is once per process
    plain = _llama(seed)
    model = copy.deepcopy(plain)
    mmfast.patch(model, fused_loss=False, verbose=False)
    ids = torch.randint(0, 64, (2, 6))
    model(input_ids=ids)  # the fast check has seen SiLU fused
    for m in (plain, model):
        del m.model.layers[0].mlp.act_fn
        m.model.layers[0].mlp.act_fn = torch.nn.ReLU() if other == "module" else F.relu
    with pytest.warns(RuntimeWarning, match=f"act_fn is {'ReLU' if other == 'module' else 'function'}, not SiLU"):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, plain(input_ids=ids).logits)


def test_flop_counting_keeps_the_fused_activations(seed, recwarn):
    """PyTorch's FlopCounterMode (Lightning's measure_flops) registers a hook for every module through its
    module tracker, only to attribute work: the MLPs stay fused under it (they fell back to their original
    forward, with a warning, so the count described the unpatched model)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _llama(seed)
    mmfast.patch(model, fused_loss=False, verbose=False)
    ids = torch.randint(0, 64, (2, 6))
    with FlopCounterMode(display=False), mmfast.backends_used() as used:
        model(input_ids=ids).logits.sum().backward()
    assert sum(k for u, k in used.items() if u.op == "swiglu") == 2 * 2  # each layer's, forward and backward
    assert not [w for w in recwarn if "original forward" in str(w.message)]


def test_a_class_level_activation_override_after_fusing_runs(seed, monkeypatch):
    """A global override of the activation class's forward made after the MLPs ran fused (the per-call
    check remembers fused types) still takes the MLPs back to their original forward."""
    plain = _llama(seed)
    model = copy.deepcopy(plain)
    mmfast.patch(model, fused_loss=False, verbose=False)
    ids = torch.randint(0, 64, (2, 6))
    model(input_ids=ids)  # fused: the type is remembered
    act_type = type(model.model.layers[0].mlp.act_fn)  # SiLUActivation, or nn.SiLU in older transformers
    monkeypatch.setattr(act_type, "forward", lambda self, x: torch.relu(x))
    with pytest.warns(RuntimeWarning, match="runs its original forward"):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, plain(input_ids=ids).logits)


def test_only_wrapper_packages_hooks_are_let_through():
    """A hook from a wrapper package (or a module inside one) may be bypassed by a fused path; one from a
    package that only starts with the same letters is the user's and must run (it was let through)."""
    from mmfast.patching.core import foreign_hook

    for package, foreign in (("deepspeed", False), ("deepspeed.runtime.zero", False), ("accelerate.hooks", False),
                             ("deepspeed_probe", True), ("accelerate_utils", True), ("mmfast_ext", True),
                             ("torch.distributed_extras", True)):
        act = torch.nn.SiLU()
        act.register_forward_hook(as_from(package, lambda module, args, out: out))
        found = foreign_hook(act, "on act_fn")
        assert (found is not None) == foreign, (package, found)
        if foreign:
            assert package in found


@pytest.mark.parametrize("act", ["transformers", "torch"])
def test_plain_silu_is_fused_and_a_global_override_of_it_is_not(act, seed, monkeypatch):
    """``act_fn`` the config's SiLU (transformers') or an ``nn.SiLU`` (older transformers', or the user's)
    takes the fused gate; with the class's ``forward`` replaced for every instance before patching (a
    library's global patch) the MLP is skipped and computes the override (the fused SiLU dropped it)."""
    plain = _llama(seed)
    if act == "torch":
        for layer in plain.model.layers:
            layer.mlp.act_fn = torch.nn.SiLU()
    assert mmfast.patch(copy.deepcopy(plain), fused_loss=False, verbose=False).mlps == ["model.layers.0.mlp",
                                                                                        "model.layers.1.mlp"]
    model = copy.deepcopy(plain)
    monkeypatch.setattr(type(plain.model.layers[0].mlp.act_fn), "forward", lambda self, x: torch.relu(x))
    report = mmfast.patch(model, fused_loss=False, verbose=False)
    assert report.mlps == [] and "not SiLU" in dict(report.skipped)["model.layers.0.mlp"]
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_global_hook_of_the_user_is_not_bypassed(seed, monkeypatch):
    """A hook registered for every module (``register_module_forward_hook``) by the user runs on the
    activation too: registered before patching, the MLPs are skipped with the reason; registered after a
    fused call, they run their original forward (the fused kernel never calls the activation)."""
    monkeypatch.setattr("mmfast.ops.backend._warned", set())  # the warning is once per process
    plain = _llama(seed)
    ids = torch.randint(0, 64, (2, 6))
    after = copy.deepcopy(plain)
    mmfast.patch(after, fused_loss=False, verbose=False)
    after(input_ids=ids)  # fused: the per-call check remembers the type
    seen = []

    def hook(mod, args, out):
        if type(mod) is type(plain.model.layers[0].mlp.act_fn):
            seen.append(1)
            return out * 2
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            want = plain(input_ids=ids).logits
        assert len(seen) == 2
        report = mmfast.patch(copy.deepcopy(plain), fused_loss=False, verbose=False)
        assert report.mlps == [] and "hook" in dict(report.skipped)["model.layers.0.mlp"]
        seen.clear()
        with pytest.warns(RuntimeWarning, match="runs its original forward: a forward hook"), torch.no_grad():
            got = after(input_ids=ids).logits
        assert len(seen) == 2
    finally:
        handle.remove()
    torch.testing.assert_close(got, want)


def test_an_instance_forward_on_the_activation_is_not_bypassed(seed, monkeypatch):
    """An activation whose instance ``forward`` was replaced (a hub kernel, a user's override) before
    patching: the MLP is skipped with the reason; replaced after patching (and after a fused call, which
    the per-call check remembers): the MLP runs its original forward, so the override computes."""
    monkeypatch.setattr("mmfast.ops.backend._warned", set())  # the warning is once per process
    plain = _llama(seed)
    ids = torch.randint(0, 64, (2, 6))

    def override(m):
        act = m.model.layers[0].mlp.act_fn
        act.forward = lambda x: torch.relu(x)

    before = copy.deepcopy(plain)
    override(before)
    report = mmfast.patch(before, fused_loss=False, verbose=False)
    assert report.mlps == ["model.layers.1.mlp"] and "not SiLU" in dict(report.skipped)["model.layers.0.mlp"]

    after = copy.deepcopy(plain)
    mmfast.patch(after, fused_loss=False, verbose=False)
    after(input_ids=ids)  # fused: the activation's type is remembered as fusable
    override(after)
    override(plain)
    with pytest.warns(RuntimeWarning, match="runs its original forward: act_fn is SiLU"):
        got = after(input_ids=ids).logits
    with torch.no_grad():
        want = plain(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(before(input_ids=ids).logits, got)
