"""mmfast.patch(model, tuning="mma"): adapters in LLaMA blocks and CLIP layers, per-sample routing,
training, parameter counts, save/load, unpatch."""

import copy
import functools
import inspect
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.tuning.mma import _STATE, ADAPTER_NAME, EMBEDDING_NAME
from tiny_models import batch, build, first_output, llava_7b_config


def _perturb_adapters(model, seed=0):
    """Give every adapter non-zero up weights (a fresh one is the identity) so routing shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "mma_adapter.up_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _mma(kind="llava", seed=0, dropout=0.0, feature_layer=None):
    """A tiny model with MMA inserted; dropout off by default so that runs can be compared. The tiny
    LLaVA reads its 2-layer tower's hidden state -2 (layer 0's output) unless ``feature_layer`` says."""
    model = build(kind, seed)
    if feature_layer is not None:
        model.config.vision_feature_layer = feature_layer
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=dropout), verbose=False)
    return model


def _plainly_routed(kind="llava"):
    """An MMA model in eval whose routing shows plainly in its logits: adapters away from the identity,
    routers far from uniform (temperature 10)."""
    model = _mma(kind)
    _perturb_adapters(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "mma_adapter.router" in n:
                p.mul_(100)
    return model.eval()


def _cache_kw(model) -> str:
    """The name of the KV cache argument of ``model``'s forward: ``cache`` from transformers 5.24,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _assert_same_generation(got, want):
    """Two ``generate(..., return_dict_in_generate=True, output_logits=True)`` results: same tokens, and
    logits within fp32 noise."""
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mma_parameter_count_7b():
    """METHODS.md's counts, less the adapter of the last CLIP layer: LLaVA-1.5 reads the tower's
    second-to-last hidden state (vision_feature_layer=-2), so that layer's output is never used."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_7b_config())
    before = {n for n, _ in model.named_parameters()}
    report = mmfast.patch(model, tuning="mma", verbose=False)
    added = {n: p for n, p in model.named_parameters() if n not in before}
    assert all("mma" in n for n in added)
    assert sum(p.numel() for p in added.values()) == 32 * 81_930 + 23 * 20_490 + 2 * 4_096 == 3_101_222
    assert sum(p.numel() for n, p in added.items() if "vision_tower" in n) == 23 * 20_490
    assert not any("encoder.layers.23." in n for n in added)
    assert [p for p, _ in report.skipped] == ["model.vision_tower.encoder.layers.23"]
    assert len(report.adapters) == 32 + 23 + 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(added) | {n for n in before if "multi_modal_projector" in n}
    assert report.trainable_params == 3_101_222 + 20_979_712
    assert all(p.dtype == torch.float32 for p in added.values())


@pytest.mark.parametrize("size,feature_layer,total", [
    ("7b", -1, 3_781_296), ("13b", -1, 5_390_080),  # every CLIP layer read: METHODS.md's totals exactly
    ("7b", -2, 3_781_296 - 20_490), ("13b", -2, 5_390_080 - 20_490),  # LLaVA-1.5 reads hidden state -2
])
def test_mma_parameter_count_with_the_visual_neck(size, feature_layer, total):
    """MMAOptions(neck=True): LaVIN's visual neck (Linear 1024->128, SiLU, Linear 128->D) replaces the
    projector; METHODS.md's trainable totals ("3.8M" at 7B, "5.4M" at 13B) come out."""
    from transformers import LlavaForConditionalGeneration

    cfg = llava_7b_config()
    if size == "13b":
        cfg.text_config.update(dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                    num_attention_heads=40, num_key_value_heads=40))
    cfg.vision_feature_layer = feature_layer
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    report = mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(neck=True), verbose=False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert report.trainable_params == sum(p.numel() for p in trainable.values()) == total
    assert all("mma" in n for n in trainable) and all(p.dtype == torch.float32 for p in trainable.values())
    D = cfg.text_config.hidden_size
    neck = {n: tuple(p.shape) for n, p in trainable.items() if "multi_modal_projector" in n}
    assert neck == {"model.multi_modal_projector.mma_neck.0.weight": (128, 1024),
                    "model.multi_modal_projector.mma_neck.0.bias": (128,),
                    "model.multi_modal_projector.mma_neck.2.weight": (D, 128),
                    "model.multi_modal_projector.mma_neck.2.bias": (D,)}
    assert "model.multi_modal_projector.mma_neck" in report.adapters


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_visual_neck_trains_and_unpatches(tmp_path, dtype):
    """The neck computes in fp32 inside a model of any dtype and hands the language model features in
    the model's dtype (fp16 for the low precision: the CPU tests run the adapters' kernels through
    Triton's interpreter, whose bf16 products are unusable); it learns, saves and loads with the rest, and unpatch puts the very projector
    it replaced back."""
    model = build("llava", dtype=dtype)
    pristine = copy.deepcopy(model)
    projector = model.model.multi_modal_projector
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(neck=True, dropout=0.0), verbose=False)
    neck = model.model.multi_modal_projector
    assert neck is not projector and all(p.dtype == torch.float32 and p.requires_grad for p in neck.parameters())
    assert not any(p.requires_grad for p in projector.parameters())
    feats = torch.randn(3, 5, model.config.vision_config.hidden_size, dtype=dtype)
    assert neck(feats).dtype == dtype and neck(feats).shape == (3, 5, model.config.text_config.hidden_size)
    inputs = batch("llava", images=[True, False], dtype=dtype)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = [p.detach().clone() for p in neck.parameters()]
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in neck.parameters())
        opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, neck.parameters()))

    path = tmp_path / "neck.safetensors"
    names = mmfast.save_trainable(model, path)
    assert sum("mma_neck" in n for n in names) == 4
    fresh = build("llava", dtype=dtype)
    mmfast.patch(fresh, tuning="mma", mma=mmfast.MMAOptions(neck=True, dropout=0.0), verbose=False)
    mmfast.load_trainable(fresh, path)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, fresh(**inputs).logits)

    mmfast.unpatch(model)
    assert model.model.multi_modal_projector is projector
    assert repr(model) == repr(pristine)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, pristine.eval()(**inputs).logits)


def test_visual_neck_moves_with_the_model_and_initialises_after_meta():
    """The replaced projector, kept outside the module tree for unpatch, follows the model's casts and
    moves; a neck built on the meta device gets LaVIN's init from reset_parameters after to_empty."""
    model = build("llava")
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(neck=True), verbose=False)
    model.to(torch.float64)
    neck = model.model.multi_modal_projector
    assert all(p.dtype == torch.float64 for p in neck.replaced.parameters())
    mmfast.unpatch(model)
    assert all(p.dtype == torch.float64 for p in model.parameters())

    from transformers import LlavaForConditionalGeneration

    from tiny_models import llava_config

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config())
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(neck=True), verbose=False)
    model.to_empty(device="cpu")
    neck = model.model.multi_modal_projector.mma_neck
    for layer in (neck[0], neck[2]):
        layer.reset_parameters()
        bound = (6 / (layer.in_features + layer.out_features)) ** 0.5  # xavier-uniform
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert layer.weight.abs().max() <= bound and layer.weight.std() > bound / 4
    assert not any(p.is_meta for p in model.model.multi_modal_projector.replaced.parameters())


def test_visual_neck_replaces_only_a_per_token_projector():
    """A projector that merges tokens (a pixel shuffle) or needs more than the features cannot be
    replaced by the neck: patching says so instead of failing at the first forward."""
    from torch import nn

    class Merger(nn.Module):  # 2x2 tokens -> 1, as a pixel shuffle does
        def __init__(self, width, out):
            super().__init__()
            self.linear = nn.Linear(4 * width, out)

        def forward(self, x):
            return self.linear(x.reshape(x.shape[0], x.shape[1] // 4, -1))

    class Sized(nn.Module):  # needs the image sizes too
        def __init__(self, width, out):
            super().__init__()
            self.linear = nn.Linear(width, out)

        def forward(self, x, image_sizes):
            return self.linear(x)

    for kind, match in ((Merger, r"maps \[1, 4, 24\] features to \(1, 1, 40\)"), (Sized, "image_sizes")):
        model = build("llava")
        model.model.multi_modal_projector = kind(24, 40)
        forwards = {n: m.forward for n, m in model.named_modules()}
        with pytest.raises(ValueError, match=match):
            mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(neck=True), verbose=False)
        # refused before anything changed (adapters, hooks and options were in, the norms patched), so
        # patching without the neck then works
        assert {n: m.forward for n, m in model.named_modules()} == forwards and mmfast.unpatch(model) == 0
        mmfast.patch(model, tuning="mma", verbose=False)


def test_patching_again_with_other_options_changes_nothing():
    """Other options on an MMA-patched model are refused before patch changes anything (it patched the
    MLPs a first patch had left alone, then raised)."""
    model = build("llava")
    mmfast.patch(model, tuning="mma", fused_mlp=False, verbose=False)
    forwards = {n: m.forward for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="other options"):
        mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.2), verbose=False)
    assert {n: m.forward for n, m in model.named_modules()} == forwards


def test_a_routing_state_pickled_before_its_newer_fields_loads():
    """A patched model pickled by an earlier version (its routing state without the fields added since)
    unpickles into a state that works."""
    import pickle

    from mmfast.tuning import mma

    state = mma._State(has_image=torch.tensor([True]))
    for old in ({"has_image": torch.tensor([True]), "routes": {0: torch.ones(1, 4)}, "recording": False},
                {"has_image": torch.tensor([True]), "routes": {}, "recording": False, "seen": {}}):
        restored = mma._State.__new__(mma._State)
        restored.__setstate__(old)  # (the routes it held by layer index are on the layers' slots now)
        assert restored.__dict__.keys() == state.__dict__.keys() and restored.has_image.tolist() == [True]
    assert pickle.loads(pickle.dumps(state)).has_image.tolist() == [True]


def test_a_module_shared_with_an_mma_model_is_refused():
    """Two models sharing one vision tower or language model (a policy and its reference model), both patched
    with tuning="mma": the second took the shared tower's adapters for its own, inserted no language-model
    adapters and no modality embedding, and trained its projector alone without a word. It is refused now,
    before anything changes; with a tower of its own it patches as usual."""
    for shared in ("vision_tower", "language_model"):  # (the second's own tower got no adapters, no routing)
        first, second = build("llava"), build("llava", seed=1)
        setattr(second.model, shared, getattr(first.model, shared))
        mmfast.patch(first, tuning="mma", verbose=False)
        before = {n: p.requires_grad for n, p in second.named_parameters()}
        with pytest.raises(ValueError, match="already hold MMA adapters, but LlavaForConditionalGeneration was not"):
            mmfast.patch(second, tuning="mma", verbose=False)
        assert {n: p.requires_grad for n, p in second.named_parameters()} == before
    second = build("llava", seed=1)  # with a copy of the first's tower (adapters and all): its own
    second.model.vision_tower = copy.deepcopy(first.model.vision_tower)
    mmfast.unpatch(second)  # (the copy's adapters, copied from the first model's tower, go)
    report = mmfast.patch(second, tuning="mma", verbose=False)
    assert any("language_model" in a for a in report.adapters) and any(EMBEDDING_NAME in a for a in report.adapters)


def test_patching_again_with_another_neck_choice_is_refused():
    model = _mma()
    with pytest.raises(ValueError, match="without the visual neck"):
        mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(neck=True), verbose=False)
    mmfast.unpatch(model)
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(neck=True), verbose=False)
    with pytest.raises(ValueError, match="with the visual neck"):
        mmfast.patch(model, tuning="mma", verbose=False)
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(neck=True), verbose=False)  # the same choice: a no-op


def test_patching_again_with_other_options_is_refused():
    """Other adapter options on an MMA-patched model raise, naming them (the call returned as if it had
    applied them, and the adapters kept temperature 10 where 5 was asked); the same options are a no-op,
    and after unpatch the new ones apply."""
    model = _mma()
    adapters = [m for m in model.modules() if isinstance(m, mmfast.MMAdapter)]
    new = mmfast.MMAOptions(temperature=5.0, dropout=0.1)
    with pytest.raises(ValueError, match=r"temperature=10.0 \(asked 5.0\), dropout=0.0 \(asked 0.1\)"):
        mmfast.patch(model, tuning="mma", mma=new, verbose=False)
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)
    assert [m for m in model.modules() if isinstance(m, mmfast.MMAdapter)] == adapters
    mmfast.unpatch(model)
    mmfast.patch(model, tuning="mma", mma=new, verbose=False)
    assert all(m.temperature == 5.0 and m.dropout == 0.1 for m in model.modules() if isinstance(m, mmfast.MMAdapter))


def test_new_adapters_leave_the_model_unchanged():
    """At init every adapter is the identity: logits equal those of the model with fused norms only."""
    base = build("llava")
    plain = copy.deepcopy(base)
    mmfast.patch(plain, verbose=False)
    mmfast.patch(base, tuning="mma", verbose=False)
    inputs = batch("llava", images=[True, False])
    with torch.no_grad():
        assert torch.equal(first_output(base(**inputs)), first_output(plain(**inputs)))


def test_mma_trains_tiny_llava():
    model = _mma(dropout=0.1)
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(EMBEDDING_NAME in n for n in trainable) and any("router" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-3)
    inputs = batch("llava", seed=4, images=[True, False])
    losses = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0], losses
    # LLaVA reads the second-to-last vision layer, so the last layer's adapter never gets a gradient
    unused = f"vision_tower.encoder.layers.{model.config.vision_config.num_hidden_layers - 1}."
    missing = [n for n, p in trainable.items() if unused not in n and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient after training steps: {missing}"
    assert all(p.grad is None for n, p in trainable.items() if unused in n)


def test_the_language_model_called_alone_routes_as_text():
    """The language model called on its own (no model forward around it) routed by the flags of whatever
    model forward ran last, when the batch size matched: the same text gave other hidden states after an
    image batch than after a text one. It routes as text now, whatever ran before."""
    model = _mma()
    _perturb_adapters(model)
    model.eval()
    lm = model.model.language_model
    text = batch("llava", seed=7, images=[False, False])["input_ids"]
    with torch.no_grad():
        alone = lm(input_ids=text).last_hidden_state
        for images in ([True, True], [False, False], [True, True]):
            model(**{k: v for k, v in batch("llava", seed=1, images=images).items() if k != "labels"})
            assert torch.equal(lm(input_ids=text).last_hidden_state, alone), images
        # a model forward that failed before its language model ran (in the vision tower)
        handle = model.model.vision_tower.register_forward_hook(lambda *_: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            model(**{k: v for k, v in batch("llava", seed=1, images=[True, True]).items() if k != "labels"})
        handle.remove()
        assert torch.equal(lm(input_ids=text).last_hidden_state, alone)
        # one a KeyboardInterrupt cut there: PyTorch runs no hook after it (not the model's either), so the
        # image flags stayed live and the language model called alone took them
        def interrupt(*_):
            raise KeyboardInterrupt

        handle = model.model.vision_tower.register_forward_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            model(**{k: v for k, v in batch("llava", seed=1, images=[True, True]).items() if k != "labels"})
        handle.remove()
        assert torch.equal(lm(input_ids=text).last_hidden_state, alone)
        # the state such a cut leaves behind copies and pickles (what it holds of the cut forward does not)
        handle = model.model.vision_tower.register_forward_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            model(**{k: v for k, v in batch("llava", seed=1, images=[True, True]).items() if k != "labels"})
        handle.remove()
        other = copy.deepcopy(model)  # (transformers leaves hooks of its own, which do not pickle)
        assert torch.equal(other.model.language_model(input_ids=text).last_hidden_state, alone)
        state = pickle.loads(pickle.dumps(lm.__dict__[_STATE]))
        assert state.runner is None and not state.live
        # the model as a whole still routes by its own inputs (and so differently for images)
        ids = batch("llava", seed=1, images=[True, True])
        ids = {k: v for k, v in ids.items() if k != "labels"}
        flagged = model(**ids, mma_has_image=torch.tensor([True, True])).logits
        assert not torch.allclose(flagged, model(**ids, mma_has_image=torch.tensor([False, False])).logits)


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens_q", "seq_idx"])
def test_packed_rows_of_mixed_modality_are_refused(how):
    """Padding-free batches (DataCollatorWithFlattening, TRL's padding_free) pack several samples into a row;
    the unpatched model keeps them apart. MMA routes a row by one flag, so a text sample packed beside an
    image sample was routed as an image sample, and its outputs and gradients depended on what it was packed
    with. Such a row is refused now, naming it; rows of one modality route as their samples alone do."""
    from tiny_models import IMAGE_SIZE, IMAGE_TOKEN, IMAGE_TOKENS, VOCAB

    model = _mma()
    _perturb_adapters(model)
    model.eval()
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, VOCAB - 1, (10,), generator=g)
    image[1:1 + IMAGE_TOKENS] = IMAGE_TOKEN
    text, text2 = (torch.randint(0, VOCAB - 1, (n,), generator=g) for n in (8, 6))
    pix = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)

    def packed(*samples):
        ids = torch.cat(samples)[None]
        ends = torch.tensor([0, *torch.tensor([len(t) for t in samples]).cumsum(0).tolist()], dtype=torch.int32)
        if how == "position_ids":
            return {"position_ids": torch.cat([torch.arange(len(t)) for t in samples])[None]}, ids
        if how == "cu_seq_lens_q":  # (with position_ids, as the collator gives them)
            return {"cu_seq_lens_q": ends, "cu_seq_lens_k": ends, "max_length_q": 10, "max_length_k": 10}, ids
        return {"seq_idx": torch.cat([torch.full((len(t),), i) for i, t in enumerate(samples)])[None]}, ids

    extra, ids = packed(image, text)
    with pytest.raises(ValueError, match="row 0 of this batch packs samples with images beside samples without"):
        model(input_ids=ids, pixel_values=pix, use_cache=False, **extra)
    # an image sample that starts with its image tokens, after a text sample: a sample's first token is its own
    # (a boundary token counted in the sample before it gave the text sample an image, and the row passed)
    extra, ids = packed(text, image.roll(-1))
    with pytest.raises(ValueError, match="row 0 of this batch packs samples with images beside samples without"):
        model(input_ids=ids, pixel_values=pix, use_cache=False, **extra)
    with torch.no_grad():  # no visual input: the image-token ids merge nothing, the row routes as text
        torch.testing.assert_close(model(input_ids=ids, use_cache=False, **extra).logits,
                                   model(input_ids=ids, use_cache=False, mma_has_image=torch.tensor([False]),
                                         **extra).logits, rtol=0, atol=0)
    # a row of one modality routes as its samples alone (position_ids: the unpatched model keeps them apart)
    extra, ids = packed(text, text2)
    with torch.no_grad():
        row = model(input_ids=ids, use_cache=False, **extra).logits[0]
        if how == "position_ids":
            torch.testing.assert_close(row[:8], model(input_ids=text[None]).logits[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(row[8:], model(input_ids=text2[None]).logits[0], rtol=1e-5, atol=1e-5)
        # the row's own flag, as asked
        model(input_ids=torch.cat([image, text])[None], pixel_values=pix, use_cache=False,
              mma_has_image=torch.tensor([True]), **packed(image, text)[0])
        # left padding has restarting position_ids too, beside an attention mask: not packing (the mask and
        # the position ids passed by position too)
        pad = torch.cat([torch.zeros(2, dtype=torch.long), image])[None]
        mask, pos = (torch.arange(12) >= 2)[None].long(), torch.tensor([[1, 1, *range(10)]])
        model(input_ids=pad, pixel_values=pix, attention_mask=mask, position_ids=pos)
        model(pad, pix, mask, pos)
    # a sample whose labels are all ignored (a padding-free collator's padding to a multiple: each pad token a
    # sample of its own) trains nothing: not counted; one that is labelled is
    extra, ids = packed(image, image.clone())
    if how == "position_ids":
        ids, extra = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1), \
            {"position_ids": torch.cat([extra["position_ids"], torch.zeros(1, 3, dtype=torch.long)], 1)}
        labels = ids.clone()
        labels[:, -3:] = -100
        model(input_ids=ids, pixel_values=torch.cat([pix, pix]), labels=labels, use_cache=False, **extra)
        labels[:, -1] = 5
        with pytest.raises(ValueError, match="row 0 of this batch packs"):
            model(input_ids=ids, pixel_values=torch.cat([pix, pix]), labels=labels, use_cache=False, **extra)


def _capture_mix(model, layer_path):
    adapter = model.get_submodule(layer_path + "." + ADAPTER_NAME)
    seen = []
    original = adapter.mix

    def mix(route):
        w = original(route)
        seen.append(w.detach())
        return w

    adapter.mix = mix
    return seen


def test_text_and_image_samples_route_differently():
    model = _mma()
    seen = _capture_mix(model, "model.language_model.layers.1")
    with torch.no_grad():
        model(**batch("llava", B=3, images=[True, False, True]))
    main = seen[-1]  # the modality pass ran first, the main pass last
    assert main.shape == (3, 2)
    assert not torch.allclose(main[0], main[1])
    assert torch.equal(main[0], main[2])  # same modality, same route
    with torch.no_grad():
        model(**batch("llava", B=3, images=[True, False, True]), mma_has_image=torch.tensor([False, False, True]))
    # the explicit flags win (the same route to fp32 rounding: another batch row)
    torch.testing.assert_close(seen[-1][0], main[1])
    torch.testing.assert_close(seen[-1][2], main[2])


def test_the_modality_embeddings_rows_are_text_then_image():
    """Row 0 of ``mma_modality_embedding`` is the text samples' modality token, row 1 the image samples' (the
    layout LaVIN's and earlier saved adapters have): changing one row changes only the samples of its kind."""
    model = _plainly_routed()
    inputs = batch("llava", seed=5, images=[True, False])
    emb = model.model.language_model.mma_modality_embedding.weight
    with torch.no_grad():
        before = model(**inputs).logits
        for row, changed in ((0, 1), (1, 0)):
            emb[row].add_(torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(row)))
            after = model(**inputs).logits
            assert torch.equal(after[1 - changed], before[1 - changed]), row
            assert (after[changed] - before[changed]).abs().max() > 1e-4, row
            before = after


def test_a_video_sample_routes_as_one_with_an_image():
    """A sample whose visual input is a video (LLaVA-OneVision's video tokens) has visual input as one with an
    image; it was routed as text only. (Beside an image sample: a call that brings no visual input at all
    routes its visual tokens as text, as the model merges nothing there.)"""
    from mmfast.tuning.mma import _STATE

    model = build("llava")
    model.config.video_token_id = 5
    mmfast.patch(model, tuning="mma", verbose=False)
    inputs = batch("llava", B=3, images=[False, True, False])
    inputs["input_ids"][0, 2:4] = 5
    with torch.no_grad():
        model(**inputs)
    assert model.__dict__[_STATE].has_image.tolist() == [True, True, False]


def test_compiled_with_flex_attention_routes_from_the_modality_token():
    """Compiled with flex attention, the modality pass's graph break lost the reset of the recording flag:
    the main pass's adapters routed from their own first token (logits off by 1e-2) and the flag stayed
    set. That pass runs uncompiled there; compiled and eager logits agree (forward only: flex attention
    has no backward on CPU)."""
    from mmfast.tuning.mma import _state

    model = build("llava")
    model.set_attn_implementation("flex_attention")
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)
    _perturb_adapters(model)
    model.eval()
    inputs = batch("llava", images=[True, False])
    with torch.no_grad():
        eager = model(**inputs).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")(**inputs).logits
    assert not _state(model).recording
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_llm_sample_independent_of_batch():
    """Routing is per sample: a text-only sample's logits do not depend on the other samples."""
    model = _mma()
    _perturb_adapters(model)
    both = batch("llava", seed=6, B=2, images=[True, False])
    alone = {k: v[1:] for k, v in both.items() if k != "pixel_values"}
    with torch.no_grad():
        together = model(**both).logits[1]
        single = model(**alone).logits[0]
    torch.testing.assert_close(together, single, rtol=1e-5, atol=1e-5)


def test_clip_routes_each_sample_from_its_own_cls():
    model = _mma(feature_layer=-1)  # the last layer read too: layer 1 has an adapter
    _perturb_adapters(model)
    tower = model.model.vision_tower
    pix = batch("clip-vision", seed=8, B=3)["pixel_values"]
    with torch.no_grad():
        together = tower(pixel_values=pix).last_hidden_state
        for i in range(3):
            alone = tower(pixel_values=pix[i:i + 1]).last_hidden_state[0]
            torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-5)
    # and routing does depend on the sample: swapping in another image changes sample 0's router weights
    seen = _capture_mix(model, "model.vision_tower.encoder.layers.1")  # at layer 0 every CLS is the same embedding
    layer = model.get_submodule("model.vision_tower.encoder.layers.1")
    normed = []
    layer.layer_norm1.register_forward_hook(lambda m, a, out: normed.append(a[0].detach()), prepend=True)
    with torch.no_grad():
        tower(pixel_values=pix)
        got = seen[-1]
        # from the CLS token (position 0) of the norm's output: another position, or the tokens' mean, is per
        # sample too and passes the checks above
        norm = layer.layer_norm1
        expected = getattr(layer, ADAPTER_NAME).mix(F.layer_norm(
            normed[-1].double(), norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)[:, 0])
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0], got[1])


def _perturbed_mma_tower(model):
    mmfast.patch(model, tuning="mma", verbose=False)
    _perturb_adapters(model)
    return model.eval()


def test_siglip_routes_each_sample_from_the_mean_of_its_tokens():
    """A SigLIP tower has no CLS token (position 0 is the image's corner patch): each sample routes from
    the mean of its own normed tokens, so its output does not depend on the batch's other images."""
    model = _perturbed_mma_tower(build("siglip-vision"))
    pix = batch("siglip-vision", seed=8, B=3)["pixel_values"]
    norm = model.encoder.layers[1].layer_norm1
    normed = []
    norm.register_forward_hook(lambda m, a, out: normed.append(a[0].detach()), prepend=True)
    seen = _capture_mix(model, "encoder.layers.1")
    with torch.no_grad():
        together = model(pixel_values=pix).last_hidden_state
        for i in range(3):
            alone = model(pixel_values=pix[i:i + 1]).last_hidden_state[0]
            torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-5)
        adapter = model.encoder.layers[1].mma_adapter
        expected = adapter.mix(F.layer_norm(normed[0].double(), norm.normalized_shape, norm.weight.double(),
                                            norm.bias.double(), norm.eps).mean(dim=1))
    torch.testing.assert_close(seen[0], expected.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seen[0][0], seen[0][1])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_padded_siglip2_sample_routes_from_its_patches_alone(attn):
    """SigLIP2 (NaFlex) pads a batch's images to one number of patches and masks the padding out of
    attention; the mean route leaves the padding out too, so a padded image gives what it gives alone."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    model = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                                   num_attention_heads=4, num_patches=16, patch_size=4,
                                                   attn_implementation=attn))
    model = _perturbed_mma_tower(model)
    g = torch.Generator().manual_seed(3)
    pix = torch.randn(2, 16, 3 * 4 * 4, generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 6:] = 0  # image 1: a 2x3 grid of patches, then padding
    shapes = torch.tensor([[4, 4], [2, 3]])
    with torch.no_grad():
        together = model(pixel_values=pix, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
        alone = model(pixel_values=pix[1:, :6], pixel_attention_mask=mask[1:, :6],
                      spatial_shapes=shapes[1:]).last_hidden_state
    torch.testing.assert_close(together[1, :6], alone[0], rtol=1e-5, atol=1e-5)


def test_a_padded_siglip2_sample_routes_from_its_patches_alone_compiled():
    """Compiled, the layers' inputs cannot be told apart (nothing is recorded by input): the mean route reads
    the mask its layer's pre-hook kept last, and leaves the padding out as eager code does."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    model = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                                   num_attention_heads=4, num_patches=16, patch_size=4))
    model = _perturbed_mma_tower(model)
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 6:] = 0
    inputs = dict(pixel_values=torch.randn(2, 16, 48, generator=g), pixel_attention_mask=mask,
                  spatial_shapes=torch.tensor([[4, 4], [2, 3]]))
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = model(**inputs).last_hidden_state
            compiled = torch.compile(model, backend="eager")(**inputs).last_hidden_state
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def _trained_siglip2_tower():
    """A tiny SigLIP2 (NaFlex) tower under tuning="mma", dropout off, adapters perturbed, in training mode."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    model = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                                   num_attention_heads=4, num_patches=16, patch_size=4))
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)
    _perturb_adapters(model)
    return model.train()


@pytest.mark.parametrize("reentrant", [False, True])
def test_padded_siglip2_gradients_under_activation_checkpointing(reentrant):
    """HF checkpoints a layer's forward, not its hooks: the recompute ran layer_norm1's hook without the
    layer's pre-hook, found no mask and averaged the padding in (non-reentrant: a CheckpointError; reentrant:
    gradients off by more than 100%). The recompute now finds its forward's mask by the layer's input."""
    model = _trained_siglip2_tower()
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 6:] = 0
    # (reentrant checkpointing skips a layer whose inputs need no grad: the frozen tower's would not)
    inputs = dict(pixel_values=torch.randn(2, 16, 48, generator=g).requires_grad_(), pixel_attention_mask=mask,
                  spatial_shapes=torch.tensor([[4, 4], [2, 3]]))

    probe = torch.randn(2, 16, 24, generator=g)  # (a loss whose gradients are O(1): the mean square's are 1e-8,
    # under the comparison's atol)

    def grads():
        model.zero_grad(set_to_none=True)
        (model(**inputs).last_hidden_state * probe).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    # a second batch padded otherwise (same shapes): two forwards, then one backward of their summed losses
    mask2 = torch.ones(2, 16, dtype=torch.long)
    mask2[0, 8:] = 0  # image 0: a 2x4 grid of patches, then padding
    other = dict(inputs, pixel_attention_mask=mask2, spatial_shapes=torch.tensor([[2, 4], [4, 4]]))

    def both():
        model.zero_grad(set_to_none=True)
        ((model(**inputs).last_hidden_state + model(**other).last_hidden_state) * probe).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_both = both()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any("mma_adapter.router" in n for n in plain)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)
    # the first forward's recompute keeps its own padding mask, not the later forward's
    checkpointed = both()
    for n in plain_both:
        torch.testing.assert_close(checkpointed[n], plain_both[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("between", ["evaluation", "forward-and-backward", "summed"])
def test_padded_siglip2_on_copied_inputs(between, reentrant):
    """A saved-tensor hook that copies the checkpointed inputs (save_on_cpu on a GPU; transformers'
    activation_checkpointing_enable(offload=True)): the recompute's input is not found by its storage, and its
    layer took the padding mask of the layer's latest call, whichever forward made it: an evaluation pass, or
    another forward and its backward, between a forward and its backward gave router gradients 56% off,
    silently. The recompute now takes the mask of the forward whose layer output the running backward goes
    through; through two forwards padded otherwise (their losses summed) it raises, as the decoder layers do
    (transformers 5.25; where HF's checkpoint wraps the layer's call, as in 5.17, the layer's pre-hook runs
    again in the recompute and finds the copy's mask itself: the gradients then match)."""
    g = torch.Generator().manual_seed(3)
    pix = torch.randn(2, 16, 48, generator=g).requires_grad_()  # (reentrant skips a layer whose inputs need no grad)
    mask, other = torch.ones(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long)
    mask[1, 6:], other[0, 8:] = 0, 0
    a = dict(pixel_values=pix, pixel_attention_mask=mask, spatial_shapes=torch.tensor([[4, 4], [2, 3]]))
    b = dict(pixel_values=pix, pixel_attention_mask=other, spatial_shapes=torch.tensor([[2, 4], [4, 4]]))
    probe = torch.randn(2, 16, 24, generator=g)

    def run(model):
        model.zero_grad(set_to_none=True)
        out = model(**a).last_hidden_state
        if between == "evaluation":
            with torch.no_grad():
                model.eval()
                model(**b)
                model.train()
        elif between == "forward-and-backward":
            (model(**b).last_hidden_state * probe).sum().backward()
            model.zero_grad(set_to_none=True)
        else:
            out = out + model(**b).last_hidden_state
        (out * probe).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = run(_trained_siglip2_tower())
    model = _trained_siglip2_tower()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        try:
            got = run(model)
        except RuntimeError as e:  # (where HF's checkpoint wraps the layer's call, its pre-hook sees the copy)
            assert between == "summed" and "recomputing a vision layer in a backward through 2 forwards" in str(e)
            return
    assert got.keys() == want.keys() and any("mma_adapter.router" in n for n in want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


def test_vision_mask_forms_read_by_the_mean_route():
    from mmfast.tuning.mma import _valid_tokens

    keep = torch.tensor([[True, True, False], [True, False, False]])
    assert _valid_tokens(None, 2, 3) is None
    assert torch.equal(_valid_tokens(keep.long(), 2, 3), keep)
    four = keep[:, None, None, :].expand(2, 1, 3, 3)
    assert torch.equal(_valid_tokens(four, 2, 3), keep)
    additive = torch.zeros(2, 1, 3, 3).masked_fill(~four, torch.finfo(torch.float32).min)
    assert torch.equal(_valid_tokens(additive, 2, 3), keep)
    causal = torch.ones(3, 3, dtype=torch.bool).tril()[None, None] & four  # a key is kept if any query sees it
    assert torch.equal(_valid_tokens(causal, 2, 3), keep)
    with pytest.raises(RuntimeError, match="attention mask has shape"):
        _valid_tokens(torch.ones(2, 5), 2, 3)
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = torch.tensor([2, 1])  # flex attention (Idefics3 can run it): read through the BlockMask's mask_mod
    block = create_block_mask(lambda b, h, q, kv: kv < lengths[b], 2, 1, 3, 3, device="cpu")
    assert torch.equal(_valid_tokens(block, 2, 3), keep)
    with pytest.warns(RuntimeWarning, match="attention mask of type object; its samples route from the mean"):
        assert _valid_tokens(object(), 2, 3) is None


def test_the_mean_route_sums_in_fp32_and_routes_an_all_padding_sample_from_zero():
    """The masked mean route of a half-precision tower is accumulated in fp32 (as the unmasked mean is), and a
    sample whose tokens are all padding routes from zero, not NaN (a NaN route would reach every router's
    gradient through the batch)."""
    from accuracy import assert_accurate

    from mmfast.tuning.mma import _mean_routed, _TokenMask

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 16, generator=g)  # the layer's input, which the mask is kept for
    out = (4 + torch.randn(3, 40, 16, generator=g)).to(torch.bfloat16)  # (a mean away from 0: rounding shows)
    valid = torch.rand(3, 40, generator=g) > 0.3
    valid[2] = False  # sample 2: all padding
    holder = _TokenMask()
    holder.put(x, valid)
    route = _mean_routed(holder, lambda o, r: r, (x,), out)
    count = valid.sum(1, keepdim=True).clamp_min(1)
    ref = (out.double() * valid[..., None]).sum(1) / count
    lowp = (out.float() * valid[..., None]).sum(1) / count
    assert route.dtype == torch.float32
    assert_accurate("masked mean route", route, lowp, ref, scale=ref.abs().max().item(), seed=0, terms=40)
    assert torch.equal(route[2], torch.zeros(16))
    # no mask: the mean of all tokens, in fp32 too
    route = _mean_routed(_TokenMask(), lambda o, r: r, (x,), out)
    assert_accurate("mean route", route, out.float().mean(1), out.double().mean(1),
                    scale=out.double().mean(1).abs().max().item(), seed=0, terms=40)


def test_unpatch_removes_the_siglip_route_hooks():
    model = build("siglip-vision")
    mmfast.patch(model, tuning="mma", verbose=False)
    assert model.encoder.layers[0]._forward_pre_hooks
    mmfast.unpatch(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("select,read", [(-2, 23), (-1, 24), (0, 0), (1, 1), (24, 24), (-25, 0), ([-2, -5], 23),
                                         ([3, -1], 24), ([0, 4], 4)])
def test_the_vision_layers_a_llava_model_reads(select, read):
    """Hidden state [0] is the embeddings, [i] layer i-1's output; a list reads several."""
    from types import SimpleNamespace

    from mmfast.tuning.mma import _read_vision_layers

    def tower(n, config):
        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(n))
        model.config = config
        return model, list(model.layers)

    cfg = SimpleNamespace(vision_feature_layer=select, vision_config=SimpleNamespace(num_hidden_layers=24))
    model, layers = tower(24, cfg)
    assert _read_vision_layers(model, layers) == layers[:read]
    # not a LLaVA-style config, or another count of layers in the tower: every layer
    model, layers = tower(24, SimpleNamespace())
    assert _read_vision_layers(model, layers) == layers
    model, layers = tower(12, cfg)
    assert _read_vision_layers(model, layers) == layers


@pytest.mark.parametrize("fields,read", [
    # Granite 4 Vision: its spatial layer and deepstack pairs; its vision_feature_layer (-2) is not read
    (dict(vision_feature_layer=-2, spatial_vision_layer=-1, deepstack_layer_map=[(1, 0), (2, 1)]), 24),
    (dict(vision_feature_layer=-2, spatial_vision_layer=2, deepstack_layer_map=[(1, 0), (2, 1)]), 2),
    (dict(vision_feature_layer=-1, spatial_vision_layer=3, deepstack_layer_map=[(-20, 0)]), 5),
    # Molmo 2: layer indices (layer i is hidden state i + 1)
    (dict(adapter_config=dict(vision_feature_layer=[-3, -9])), 22),
    (dict(adapter_config=dict(vision_feature_layer=[5, 2])), 6),
    # Phi-4-multimodal: the vision config's own field
    (dict(vision_config=dict(feature_layer=-2)), 23),
    (dict(vision_config=dict(feature_layer=4)), 4),
])
def test_the_vision_layers_other_families_read(fields, read):
    """Families that say which hidden states they read elsewhere than ``vision_feature_layer``: Granite 4
    Vision took its unread ``vision_feature_layer`` (-2), so the last layer it reads (``spatial_vision_layer``
    -1) had no adapter and, with spatial layer 2, a layer it never reads had one (no gradient: DDP waits for
    it); Phi-4-multimodal and Molmo 2 had adapters on every layer, read or not."""
    from types import SimpleNamespace

    from mmfast.tuning.mma import _read_vision_layers

    fields = dict(fields)
    vision = SimpleNamespace(num_hidden_layers=24, **fields.pop("vision_config", {}))
    cfg = SimpleNamespace(vision_config=vision, **{k: SimpleNamespace(**v) if isinstance(v, dict) else v
                                                   for k, v in fields.items()})
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(24))
    model.config = cfg
    assert _read_vision_layers(model, list(model.layers)) == list(model.layers)[:read]


def test_granite4_vision_adapters_sit_where_it_reads():
    """The whole model: Granite 4 Vision with a 4-layer tower reading hidden state 2 (spatial) and 1, 2
    (deepstack) gets adapters in layers 0 and 1, and the report names the fields it reads. (A tower 64 wide:
    its Q-Former takes a head per 64.)"""
    import transformers as T

    from tiny_models import IMAGE_SIZE, VOCAB, clip_vision_config, llama_config

    if not hasattr(T, "Granite4VisionConfig"):
        pytest.skip(f"transformers {T.__version__} has no Granite 4 Vision")
    cfg = T.Granite4VisionConfig(
        vision_config=clip_vision_config(num_hidden_layers=4, hidden_size=64).to_dict(),
        text_config=T.GraniteConfig(**llama_config().to_dict()).to_dict(),
        qformer_config=dict(intermediate_size=64), image_token_index=VOCAB - 1, downsample_rate="1/2",
        deepstack_layer_map=[(1, 0), (2, 1)], spatial_vision_layer=2, spatial_target_layers=[0, 1, 0, 1],
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]])
    with torch.device("meta"):
        model = T.Granite4VisionForConditionalGeneration(cfg)
    report = mmfast.patch(model, tuning="mma", verbose=False)
    layers = [n for n, _ in model.named_modules() if n.endswith(ADAPTER_NAME) and "vision_tower" in n]
    assert [n.split(".")[-2] for n in layers] == ["0", "1"]
    assert sorted(p.split(".")[-1] for p, why in report.skipped if "spatial_vision_layer=2 and deepstack" in why) \
        == ["2", "3"]


@pytest.mark.parametrize("feature_layer,adapted", [(-2, 1), (-1, 2), (1, 1), (2, 2)])
def test_vision_adapters_only_where_the_model_reads(feature_layer, adapted):
    """A LLaVA-style model reads hidden state ``vision_feature_layer`` of the tower ([0]: the embeddings,
    [i]: layer i-1's output): layers after the last one read get no adapter, which could never train."""
    model = _mma(feature_layer=feature_layer)
    have = [n for n, _ in model.named_modules() if n.endswith(ADAPTER_NAME) and "vision_tower" in n]
    assert have == [f"model.vision_tower.encoder.layers.{i}.{ADAPTER_NAME}" for i in range(adapted)]
    model.train()
    _perturb_adapters(model)
    inputs = batch("llava", images=[True, True])
    model(**inputs).loss.backward()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {n for n, p in model.named_parameters() if p.requires_grad and "vision_tower" in n} <= got_grad


def test_clip_only_model():
    model = _mma("clip-vision")
    assert all(("mma" in n) == p.requires_grad for n, p in model.named_parameters())
    assert sum(n.endswith(ADAPTER_NAME) for n, _ in model.named_modules()) == 2
    _perturb_adapters(model)
    out = model(**batch("clip-vision"))
    out.last_hidden_state.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "mma" in n and "up_" in n)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_gives_the_same_gradients(reentrant):
    model = _mma()
    _perturb_adapters(model)
    model.train()
    inputs = batch("llava", images=[True, False])
    model(**inputs).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(**{("activation_checkpointing_kwargs" if "activation" in enable.__name__ else "gradient_checkpointing_kwargs"):
              {"use_reentrant": reentrant}})
    layers = model.model.language_model.layers
    calls = []  # (the modality pass lowers the layers' checkpointing flag for its own call only)
    hooks = [layer.self_attn.register_forward_hook(lambda *_: calls.append(1)) for layer in layers]
    for _ in range(2):  # (the second forward finds checkpointing on as the first left it)
        calls.clear()
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        # each layer: the modality token's pass, the main pass, and the main pass recomputed in backward
        assert all(layer.gradient_checkpointing for layer in layers) and len(calls) == 3 * len(layers)
    for h in hooks:
        h.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-6, atol=1e-7, msg=n)


def test_an_input_record_is_found_by_its_own_input_only():
    """What a layer records against its input (its route, its padding mask) is found again by that input or an
    alias of its storage (checkpointing's recompute), not by another view that starts where it does (another
    shape) nor by a new view in its place after it is gone."""
    from mmfast.tuning.mma import _ByInput

    base = torch.randn(4, 6)
    records = _ByInput()
    x = base[:2]
    records.put(x, "x")
    assert records.get(x) == "x" and records.get(x.detach()) == "x"
    assert records.get(base[:1]) is None and records.get(base[:2].view(3, 4)) is None
    del x
    assert records.get(base[:2]) is None


@pytest.mark.parametrize("checkpointing", [None, True, False], ids=["off", "reentrant", "non-reentrant"])
def test_two_forwards_then_one_backward(checkpointing):
    """Two forwards with different routing, then one backward of the summed losses (contrastive or summed
    losses, a forward between another's forward and backward): the gradients of two forward/backward
    pairs. Under activation checkpointing a layer recomputed in backward read the latest forward's routes
    (non-reentrant: silently wrong gradients; reentrant: a misleading error)."""
    def make():
        model = _mma()
        _perturb_adapters(model)
        model.train()
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        return model

    a, b = batch("llava", seed=1, images=[True, False]), batch("llava", seed=2, images=[False, False])
    ref, model = make(), make()
    # a forward without grad on the same embeddings, between a training forward and its backward (an
    # evaluation pass) takes no part in the recompute's routing
    same0 = ref.get_input_embeddings()(a["input_ids"]).detach()
    kw = dict(inputs_embeds=same0, labels=a["input_ids"], mma_has_image=torch.tensor([True, False]))
    ref(**kw).loss.backward()
    model.load_state_dict(ref.state_dict())
    loss = model(**kw).loss
    with torch.no_grad():
        model(inputs_embeds=same0, mma_has_image=torch.tensor([False, True]))
    loss.backward()
    _assert_grads_as(model, ref)
    model.load_state_dict(ref.state_dict())
    # the second pair: one embeddings tensor passed to both forwards, routed two ways (the layers' inputs
    # then share storage between the two live forwards)
    ids = a["input_ids"]
    same = ref.get_input_embeddings()(ids).detach()
    pairs = [(a, b), *[({"inputs_embeds": same, "labels": ids, "mma_has_image": torch.tensor(f)},) for f in
                       ([True, True], [False, False])]]
    pairs = [pairs[0], (pairs[1][0], pairs[2][0])]
    for x, y in pairs:
        ref.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        ref(**x).loss.backward()
        ref(**y).loss.backward()
        (model(**x).loss + model(**y).loss).backward()
        _assert_grads_as(model, ref)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_inputs_copied_by_a_saved_tensor_hook(reentrant):
    """A saved-tensor hook that copies what it saves (``save_on_cpu`` on a GPU, activation offloading) hands
    checkpointing a copy of each layer's input, which no forward recorded: the recompute takes the route of
    the forward the running backward goes through (not an evaluation pass's or another forward's since), and
    a backward through two forwards' summed losses raises. (It took the latest forward's routes: silently wrong gradients, a misleading error,
    or checkpointing's "different number of tensors" one.)"""
    def make():
        model = _mma()
        _perturb_adapters(model)
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        return model

    def copying():
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)

    a, b = batch("llava", seed=1, images=[True, False]), batch("llava", seed=2, images=[False, True])
    ref, model = make(), make()
    model.load_state_dict(ref.state_dict())
    ref(**a).loss.backward()
    ref(**b).loss.backward()
    for x, y in ((a, b), (b, a)):  # each forward's backward before the next training forward, an evaluation between
        with copying():
            loss = model(**x).loss
        with torch.no_grad():
            model(**y)
        loss.backward()
    _assert_grads_as(model, ref)
    # a retained graph's second backward, after another forward's (its graph kept too), and a forward cut by an
    # error whose graph something keeps (a notebook's last traceback): each backward takes its own forward's
    model.zero_grad(set_to_none=True)
    with copying():
        la = model(**a).loss
    la.backward(retain_graph=True)
    with copying():
        lb = model(**b).loss
    lb.backward()
    model.zero_grad(set_to_none=True)
    la.backward()
    ref.zero_grad(set_to_none=True)
    ref(**a).loss.backward()
    _assert_grads_as(model, ref)
    cut = []

    def interrupt(module, args, output):
        cut.append(output)  # (the cut forward's graph, kept)
        if len(cut) == 2:  # (the main pass, not the modality token's)
            raise KeyboardInterrupt

    handle = model.model.language_model.layers[1].register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), copying():
        model(**a)
    handle.remove()
    model.zero_grad(set_to_none=True)
    with copying():
        loss = model(**b).loss
    loss.backward()
    ref.zero_grad(set_to_none=True)
    ref(**b).loss.backward()
    _assert_grads_as(model, ref)
    with copying():
        loss = model(**a).loss + model(**b).loss
    with pytest.raises(RuntimeError, match="a backward through 2 forwards of this model.*saved-tensor hook"):
        loss.backward()


def test_a_forward_on_another_thread_while_one_runs_is_refused():
    """The routes are the model's state: a forward on a second thread while the first one's runs replaced its
    routes, and both gave wrong outputs without a word. It is refused (the language model called alone too,
    and also after a nested forward of the model on the first thread ended); the running forward is left as
    it was, and a thread's forward after it (or after a thread whose forward a KeyboardInterrupt cut) runs."""
    import threading

    model = _mma()
    _perturb_adapters(model)
    model.eval()
    a, b = batch("llava", seed=1, images=[True, False]), batch("llava", seed=2, images=[False, True])
    with torch.no_grad():
        want = {"a": model(**a).logits, "b": model(**b).logits}
    got, errors = {}, []

    def on_thread(fn):
        def run():
            try:
                with torch.no_grad():
                    fn()
            except (RuntimeError, KeyboardInterrupt) as e:
                errors.append(e)
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()

    def forward_b():
        got["b"] = model(**b).logits

    def nested_then_other():
        with torch.no_grad():
            model(**b)
        on_thread(forward_b)

    layer = model.model.language_model.layers[0]
    lm_alone = functools.partial(model.model.language_model, input_ids=b["input_ids"])
    for inner in (functools.partial(on_thread, forward_b), functools.partial(on_thread, lm_alone),
                  nested_then_other):
        errors.clear()
        calls = []

        def inside(*_, inner=inner, calls=calls):  # inside a's forward (layer 0's first call: the modality pass)
            if not calls:
                calls.append(1)
                inner()

        handle = layer.register_forward_hook(inside)
        with torch.no_grad():
            logits = model(**a).logits
        handle.remove()
        assert len(errors) == 1 and "running a forward on another thread" in str(errors[0]), errors
        assert "b" not in got
        if inner is not nested_then_other:  # (a nested forward on one thread replaces the routes: not refused)
            assert torch.equal(logits, want["a"])

    def interrupt(*_):
        raise KeyboardInterrupt

    handle = layer.register_forward_hook(interrupt)
    on_thread(functools.partial(model, **a))
    handle.remove()
    assert isinstance(errors[-1], KeyboardInterrupt)
    on_thread(forward_b)
    with torch.no_grad():
        assert torch.equal(model(**a).logits, want["a"])
    assert torch.equal(got["b"], want["b"])
    # the language model called alone after a whole forward of the model on this thread is a forward too: a
    # forward on another thread meanwhile is refused (the ended forward's count was cleared, not left at 0
    # with its runner, which this thread no longer runs)
    errors.clear()
    got.clear()
    with torch.no_grad():
        model(**a)
    handle = layer.register_forward_hook(lambda *_: None if errors or got else on_thread(forward_b))
    with torch.no_grad():
        model.model.language_model(input_ids=a["input_ids"])
    handle.remove()
    assert len(errors) == 1 and "running a forward on another thread" in str(errors[0]), errors
    assert "b" not in got


def _trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _assert_grads_as(model, ref):
    """``model``'s trainable parameters hold the gradients ``ref``'s do."""
    want, got = _trainable_grads(ref), _trainable_grads(model)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


def test_every_backward_brings_its_own_route_gradients():
    """A second backward through a retained graph adds exactly one backward's gradients again, and two
    losses of one forward, backpropagated one after the other, give what two fresh forwards give. (The
    routes' gradients were read from leaves whose ``.grad`` kept accumulating across backward calls: the
    modality embedding got 3x one backward's gradient from two.)"""
    model = _mma()
    _perturb_adapters(model)
    model.train()
    inputs = batch("llava", images=[True, False])
    model(**inputs).loss.backward()
    once = _trainable_grads(model)
    assert EMBEDDING_NAME in " ".join(once) and all(g.abs().sum() > 0 for g in once.values())
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward(retain_graph=True)
    loss.backward()
    twice = _trainable_grads(model)
    assert twice.keys() == once.keys()
    for n in once:
        assert torch.equal(twice[n], 2 * once[n]), n

    def second(out):  # a training step with labels builds no logits (the fused loss): another loss
        return out.loss.square()

    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward(retain_graph=True)
    second(out).backward()
    one_forward = _trainable_grads(model)
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    second(model(**inputs)).backward()
    two_forwards = _trainable_grads(model)
    for n in two_forwards:
        assert torch.equal(one_forward[n], two_forwards[n]), n


def test_route_gradients_match_finite_differences():
    """The routes reach the main pass through detached leaves, and the bridge hands each leaf's gradient back
    to its own layer's route: a bridge that handed them to the wrong layers (or dropped one) still trains and
    matches itself under checkpointing, but the modality embedding's and the adapters' gradients are then not
    the loss's. Checked against central differences of the float64 model's loss along random directions, its
    RMSNorms in float64 too (model_accuracy.float64_norms): at a step of 1e-5 their error was below 4e-9
    relative here, against 0.16 with two layers' route gradients swapped."""
    from model_accuracy import float64_norms

    model = _mma()
    _perturb_adapters(model)
    with torch.no_grad():  # routers away from uniform, so that the routes' part of the gradients shows
        for n, p in model.named_parameters():
            if "mma_adapter.router" in n:
                p.mul_(10)
    model = model.double().train()
    inputs = {k: v.double() if v.is_floating_point() else v
              for k, v in batch("llava", seed=3, images=[True, False]).items()}
    labels = F.pad(inputs.pop("labels"), (0, 1), value=-100)[..., 1:]

    def loss_of():  # (in float64: HF's loss would round the logits to fp32)
        logits = model(**inputs).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    eps = 1e-5
    with mmfast.disabled(), float64_norms(model):  # (the eager adapters, which run in float64)
        loss_of().backward()
        for part in (EMBEDDING_NAME, "language_model.layers.0.mma_adapter", "language_model.layers.1.mma_adapter"):
            names = [n for n in params if part in n]
            assert names and all(params[n].grad is not None for n in names), part
            direction = {n: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for n in names}
            want = sum((params[n].grad * direction[n]).sum() for n in names).item()
            sides = []
            for sign in (1, -1):
                with torch.no_grad():
                    for n in names:
                        params[n].add_(sign * eps * direction[n])
                    sides.append(loss_of().item())
                    for n in names:
                        params[n].sub_(sign * eps * direction[n])
            got = (sides[0] - sides[1]) / (2 * eps)
            assert abs(want - got) <= 1e-6 * abs(got), (part, want, got)


@pytest.mark.parametrize("how", ["autograd.grad", "backward(inputs=...)"])
def test_a_backward_that_skips_the_routes_raises(how):
    """torch.autograd.grad and backward(inputs=...) compute only what leads to their inputs, which leaves
    the routes' part out of every adapter and router gradient (autograd.grad gave the modality embedding
    a zero gradient): a clear error instead."""
    model = _mma()
    _perturb_adapters(model)
    model.train()
    loss = model(**batch("llava", images=[True, False])).loss
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match=r"loss\.backward\(\)"):
        if how == "autograd.grad":
            torch.autograd.grad(loss, params, allow_unused=True)
        else:
            loss.backward(inputs=params)


def test_generation_keeps_prefill_routing():
    model = _mma()
    _perturb_adapters(model)
    model.eval()
    inputs = batch("llava", B=2, images=[True, False])
    inputs.pop("labels")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    state = model.__dict__["_mmfast_mma_state"]
    assert state.has_image.tolist() == [True, False]


def test_image_after_a_cached_text_prefix_routes_as_image(monkeypatch):
    """A forward on a KV cache whose prefix had no image, bringing image tokens: those samples route as
    image samples from then on (as if ``mma_has_image`` said so), with a warning that the cached prefix
    keeps its text routing. Before, the decode path kept the prefix's flags and routed the image as text."""
    import warnings

    from transformers import DynamicCache

    monkeypatch.setattr("mmfast.ops.backend._warned", set())  # the warning is once per process
    model = _mma()
    _perturb_adapters(model)
    model.eval()
    inputs = batch("llava", B=2, images=[True, False])
    ids, pix = inputs["input_ids"], inputs["pixel_values"]
    cache_kw = _cache_kw(model)
    state = model.__dict__["_mmfast_mma_state"]

    def rest(**flags):
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prefix = model(input_ids=ids[:, :1], use_cache=True, **{cache_kw: DynamicCache()})
            assert state.has_image.tolist() == [False, False]
            out = model(input_ids=ids[:, 1:], pixel_values=pix, use_cache=True,
                        **{cache_kw: prefix.past_key_values}, **flags)
        return out.logits, state.has_image.tolist(), [str(w.message) for w in caught if "mmfast MMA" in str(w.message)]

    implicit, flags, warned = rest()
    assert flags == [True, False]
    assert len(warned) == 1 and "cached text prefix" in warned[0]
    explicit, _, _ = rest(mma_has_image=torch.tensor([True, False]))
    as_text, _, _ = rest(mma_has_image=torch.tensor([False, False]))
    assert torch.equal(implicit, explicit)
    assert not torch.equal(implicit[0], as_text[0]) and torch.equal(implicit[1], as_text[1])
    # a decode step whose sampled token happens to be the image token id merges no image: routing stays
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prefix = model(input_ids=ids[1:, :1].expand(2, 1), use_cache=True, **{cache_kw: DynamicCache()})
        step = torch.full((2, 1), model.config.image_token_id)
        model(input_ids=step, use_cache=True, **{cache_kw: prefix.past_key_values})
    assert state.has_image.tolist() == [False, False] and not [w for w in caught if "mmfast MMA" in str(w.message)]
    # a sample whose image is in the cached prefix keeps its image routing when a chunk brings another
    # sample's image
    with torch.no_grad():
        prefix = model(input_ids=ids[:, :1], use_cache=True, mma_has_image=torch.tensor([False, True]),
                       **{cache_kw: DynamicCache()})
        model(input_ids=ids[:, 1:], pixel_values=pix, use_cache=True, **{cache_kw: prefix.past_key_values})
    assert state.has_image.tolist() == [True, True]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_interleaved_generations_keep_their_own_routing(compiled):
    """Two generations of one model stepped in turn (a serving loop, an evaluation harness), and a copy of
    a prompt cache continued later: each decode step routes by the flags of the prefill that filled its
    cache, also in a compiled model. Before, the latest prefill's flags went to every cache of the same
    batch size, so the first generation's image sample decoded as text."""
    from transformers import DynamicCache

    model = _mma()
    _perturb_adapters(model)
    model.eval()
    run = torch.compile(model, backend="eager") if compiled else model
    a, b = batch("llava", B=2, images=[True, False]), batch("llava", B=2, images=[False, True])
    cache_kw = _cache_kw(model)
    step = torch.randint(0, 8, (2, 1))

    def prefill(inputs):
        return run(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], use_cache=True,
                   **{cache_kw: DynamicCache()}).past_key_values

    with torch.no_grad():
        alone = model(input_ids=step, use_cache=True, **{cache_kw: prefill(a)}).logits
        cache_a = prefill(a)
        prompt = copy.deepcopy(cache_a)  # a prompt cache kept for reuse (HF's documented pattern)
        prefill(b)
        interleaved = run(input_ids=step, use_cache=True, **{cache_kw: cache_a}).logits
        prefill(b)
        reused = run(input_ids=step, use_cache=True, **{cache_kw: prompt}).logits
        explicit = run(input_ids=step, use_cache=True, mma_has_image=torch.tensor([True, False]),
                       **{cache_kw: prefill(a)}).logits
    state = model.__dict__["_mmfast_mma_state"]
    for got in (interleaved, reused, explicit):
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-6)  # (compiled: the same ops, maybe reordered)
    assert state.has_image.tolist() == [True, False]


@pytest.mark.parametrize("op", ["repeat-then-select", "reorder"])
def test_the_cache_row_operations_carry_its_routing(op):
    """A prompt cache expanded for beams or a contrastive search's candidates (the cache's
    ``batch_repeat_interleave``), rows picked back (``batch_select_indices``), beams reordered
    (``reorder_cache``): each row keeps the routing of the sample it came from, as if ``mma_has_image``
    said so. Before, the cache kept the old batch's flags; the next step took none and routed every row as
    text, for good (that fallback was stored on the cache). Flags of another batch size, left by an
    operation that does not carry them, are refused."""
    from transformers import DynamicCache
    from transformers.cache_utils import Cache

    model = _mma()
    _perturb_adapters(model)
    model.eval()
    inputs = batch("llava", B=2, images=[True, False])
    cache_kw = _cache_kw(model)

    def step(cache, samples):
        """A decode step on ``cache`` whose rows hold ``samples`` (0: the image one): as the explicit flags
        route it, and not as text."""
        ids = torch.tensor([[5], [6], [7], [8], [9], [10]])[:len(samples)]
        routed = {}
        for name, flags in (("explicit", torch.tensor(samples) == 0), ("text", torch.zeros(len(samples), dtype=torch.bool))):
            routed[name] = model(input_ids=ids, use_cache=True, mma_has_image=flags,
                                 **{cache_kw: copy.deepcopy(cache)}).logits
        got = model(input_ids=ids, use_cache=True, **{cache_kw: cache}).logits
        torch.testing.assert_close(got, routed["explicit"], rtol=0, atol=0)
        image_rows = torch.tensor(samples) == 0
        assert (got[image_rows] - routed["text"][image_rows]).abs().amax() > 1e-4  # (a route's effect: 4e-4 here)

    with torch.no_grad():
        cache = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], use_cache=True,
                      **{cache_kw: DynamicCache()}).past_key_values
        if op == "reorder":
            cache.reorder_cache(torch.tensor([1, 0]))
            step(cache, [1, 0])
            return
        cache.batch_repeat_interleave(3)
        step(cache, [0, 0, 0, 1, 1, 1])
        cache.batch_select_indices(torch.tensor([4, 1]))
        step(cache, [1, 0])
        cache.batch_select_indices(torch.tensor([True, True]))  # a bool mask, as the cache's layers take it
        step(cache, [1, 0])
        cache.batch_select_indices(torch.tensor([False, True]))
        step(cache, [0])
        cache.batch_repeat_interleave(2)
        step(cache, [0, 0])
        Cache.batch_repeat_interleave.__wrapped__(cache, 2)  # rows copied, flags not
        with pytest.raises(ValueError, match="holds the routing of 2 samples but is continued with a batch of 4"):
            model(input_ids=torch.ones(4, 1, dtype=torch.long), use_cache=True, **{cache_kw: cache})


def test_the_cache_row_operations_carry_routing_before_any_forward(monkeypatch, tmp_path):
    """The cache's row operations carry the flags from the moment MMA is applied, or a patched model is
    unpickled: a prompt cache saved with its flags and loaded beside a model that has run no forward yet,
    then expanded for beams, kept one sample's flags for two rows."""
    import pickle

    from transformers import DynamicCache
    from transformers.cache_utils import Cache

    from mmfast.tuning import mma

    originals = {n: getattr(Cache.__dict__[n], "__wrapped__", Cache.__dict__[n]) for n in mma._CACHE_ROW_OPS}
    for how in ("patched", "unpickled"):
        for name, original in originals.items():  # as in a new process
            monkeypatch.setattr(Cache, name, original)
        monkeypatch.setattr(mma, "_CARRYING", [False])
        if how == "patched":
            model = _mma()
        else:
            monkeypatch.setattr(mma, "_carry_flags_through_cache_row_ops", lambda: None)
            data = pickle.dumps(_mma())
            monkeypatch.undo()  # (the originals are back, and the flag; the function too)
            for name, original in originals.items():
                monkeypatch.setattr(Cache, name, original)
            monkeypatch.setattr(mma, "_CARRYING", [False])
            model = pickle.loads(data)
        cache = DynamicCache()
        setattr(cache, mma.CACHE_FLAGS_ATTR, torch.tensor([True, False]))
        cache.batch_repeat_interleave(2)
        assert getattr(cache, mma.CACHE_FLAGS_ATTR).tolist() == [True, True, False, False], how
        cache.batch_select_indices(indices=torch.tensor([0, 2]))  # (the argument by keyword too)
        assert getattr(cache, mma.CACHE_FLAGS_ATTR).tolist() == [True, False], how
        assert model is not None


def test_image_token_ids_without_visual_inputs_route_as_text():
    """A call that brings no visual input merges no image: its image-token ids are plain tokens to the
    model, and route as text. A text sample that generated the image token's id without a KV cache (each
    step a whole forward) switched to image routing from then on, where the cached decode steps kept it
    text. With the images given, by keyword or by position, the tokens route as before."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model = _mma()
    _perturb_adapters(model)
    model.eval()
    inputs = batch("llava", B=2, images=[True, False])
    ids, pix = inputs["input_ids"], inputs["pixel_values"]
    as_text, as_images = torch.tensor([False, False]), torch.tensor([True, False])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids, mma_has_image=as_text).logits,
                                   rtol=0, atol=0)
        routed = model(input_ids=ids, pixel_values=pix, mma_has_image=as_images).logits
        for got in (model(input_ids=ids, pixel_values=pix).logits, model(ids, pix).logits):
            torch.testing.assert_close(got, routed, rtol=0, atol=0)

    class ImageTokenFirst(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompt.shape[1]:
                scores = torch.full_like(scores, -1e9)
                scores[:, model.config.image_token_id] = 0
            return scores

    prompt = batch("llava", B=2, images=[False, False])["input_ids"]
    runs = [model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, use_cache=cached,
                           logits_processor=LogitsProcessorList([ImageTokenFirst()]), output_logits=True,
                           return_dict_in_generate=True) for cached in (True, False)]
    assert (runs[0].sequences[:, prompt.shape[1]] == model.config.image_token_id).all()
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].logits[1:], runs[1].logits[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _top_with_image_token(token_id):
    """A stand-in for the model the top hook sits on: its config's image token id."""
    import types

    return types.SimpleNamespace(config=types.SimpleNamespace(image_token_id=token_id))


@pytest.mark.parametrize("return_dict", [True, False])
def test_a_cache_the_model_made_keeps_its_routing(return_dict):
    """A forward with use_cache and no cache passed (a hand-written decode loop's prefill, a cached prefix)
    makes its own cache. Only a cache passed in got the flags, so continuing one the model made took the
    latest forward's routing: an image batch's continuation after a text forward, or a multi-token chunk
    (taken for a cache filled elsewhere), routed as text, the one-token step with a warning that the model
    had not filled the cache. It keeps its prefill's routing now, as a cache passed in does."""
    model = _mma()
    _perturb_adapters(model)
    model.eval()
    cache_kw = _cache_kw(model)
    images = batch("llava", B=2, images=[True, True])
    text = batch("llava", seed=3, B=2, images=[False, False])["input_ids"]
    ids, pix = images["input_ids"], images["pixel_values"]
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pix).logits

        def prefill(n):
            out = model(input_ids=ids[:, :n], pixel_values=pix, use_cache=True, return_dict=return_dict)
            return out[cache_kw] if return_dict else next(v for v in out if hasattr(v, "get_seq_length"))

        for n in (ids.shape[1] - 3, ids.shape[1] - 1):  # a chunk of 3 tokens, a one-token step
            for between in (False, True):
                cache = prefill(n)
                if between:  # (an evaluation batch, say)
                    model(input_ids=text)
                with warnings.catch_warnings():
                    warnings.filterwarnings("error", message="mmfast")  # no "did not fill" warning
                    got = model(input_ids=ids[:, n:], use_cache=True, **{cache_kw: cache}).logits
                torch.testing.assert_close(got, full[:, n:], rtol=1e-5, atol=1e-5)


def test_a_cache_this_model_did_not_fill_warns():
    """A non-empty cache without this model's flags (filled elsewhere) continues with the latest forward's
    routing, and says so once."""
    import types

    from mmfast.tuning import mma

    state = mma._State(has_image=torch.tensor([True, False]))
    cache = types.SimpleNamespace(get_seq_length=lambda: 4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("mmfast.ops.backend._warned", set())
        with pytest.warns(RuntimeWarning, match="did not fill"):
            mma._top_pre_hook(state, _top_with_image_token(7), (), {"input_ids": torch.tensor([[1], [2]]), "cache": cache})
    assert state.has_image.tolist() == [True, False]


def test_a_one_token_training_forward_on_a_cache_this_model_did_not_fill_routes_by_its_tokens(monkeypatch):
    """A one-token forward with labels on a non-empty cache without this model's flags (PEFT's prefix tuning
    hands every forward such a cache) is a training forward, not a decode step: its own tokens say which
    samples have images, not the latest forward's flags."""
    import types

    from mmfast.tuning import mma

    monkeypatch.setattr("mmfast.ops.backend._warned", set())
    state = mma._State(has_image=torch.tensor([True, False]))
    cache = types.SimpleNamespace(get_seq_length=lambda: 4)
    ids = torch.tensor([[1], [2]])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mmfast")  # no "did not fill" warning
        mma._top_pre_hook(state, _top_with_image_token(7), (), {"input_ids": ids, "labels": ids, "cache": cache})
    assert state.has_image.tolist() == [False, False]


def test_adapters_take_the_model_mode():
    """Adapters added to a model in eval mode (as from_pretrained returns it) are in eval mode: no dropout
    at inference. They were added in training mode, so generate after patch and load_trainable ran the
    adapters' dropout on every call."""
    model = build("llava", 0).eval()
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.1, neck=True), verbose=False)
    added = [m for n, m in model.named_modules() if "mma" in n.split(".")[-1]]
    assert added and not any(m.training for a in added for m in a.modules())
    _perturb_adapters(model)
    inputs = batch("llava", B=2, images=[True, False])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    model.train()
    assert all(m.training for a in added for m in a.modules())


def test_mma_refuses_a_language_model_it_cannot_adapt():
    """A multimodal model whose language model is not LLaMA-style (Aya Vision's Cohere2 layers have no
    post_attention_layernorm) is refused with the reason, before anything is changed; it was patched with
    vision adapters alone, the projector left frozen, and nothing said."""
    import transformers

    torch.manual_seed(0)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)
    text = dict(model_type="cohere2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=128, layer_types=["sliding_attention", "full_attention"],
                sliding_window=8, pad_token_id=0)
    model = transformers.AyaVisionForConditionalGeneration(transformers.AyaVisionConfig(
        vision_config=vision, text_config=text, image_token_id=127, downsample_factor=2, vision_feature_layer=-1))
    forwards = {n: m.forward for n, m in model.named_modules()}
    for tuning in ("mma", "layernorm"):
        with pytest.raises(ValueError, match="LLaMA-style language model"):
            mmfast.patch(model, tuning=tuning, verbose=False)
        assert {n: m.forward for n, m in model.named_modules()} == forwards, tuning
        assert all(p.requires_grad for p in model.parameters())
    assert mmfast.unpatch(model) == 0


def test_save_load_trainable_mma(tmp_path):
    model = _mma()
    _perturb_adapters(model)
    path = tmp_path / "mma.safetensors"
    names = mmfast.save_trainable(model, path)
    assert any(EMBEDDING_NAME in n for n in names)
    fresh = _mma()
    mmfast.load_trainable(fresh, path)
    inputs = batch("llava", images=[True, False])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, fresh(**inputs).logits)


def test_mma_patched_on_meta_and_loaded_without_adapters_says_so(tmp_path):
    """Patched with MMA on the meta device, then the base model's weights loaded by assignment: the adapters
    stay on meta (a base checkpoint does not hold them). The forward failed in torch ("Tensor on device meta is
    not on the expected device cpu!") and save_trainable with "Cannot copy out of meta tensor"; both say what
    happened and what to do now."""
    from transformers import LlavaForConditionalGeneration

    from tiny_models import llava_config

    base = build("llava")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config())
    mmfast.patch(model, tuning="mma", verbose=False)
    model.load_state_dict(base.state_dict(), assign=True, strict=False)
    for name, buf in base.named_buffers():  # (the non-persistent ones, which from_pretrained would make)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buf
    for images in ([True, False], [False, False]):
        with pytest.raises(RuntimeError, match="(MMAdapter: its|the modality embedding.s) weights hold no "
                                               "values, on the meta device.*Patch after loading the weights"):
            model(**batch("llava", images=images))
    with pytest.raises(ValueError, match=r"save_trainable: \d+ trainable parameters hold no values.*"
                                         r"mma_adapter.*Patch after loading"):
        mmfast.save_trainable(model, tmp_path / "mma.safetensors")
    assert not (tmp_path / "mma.safetensors").exists()


@pytest.mark.parametrize("neck", [False, True])
def test_mma_patched_on_meta_starts_from_its_init_after_to_empty(neck, monkeypatch):
    """Patched with MMA on the meta device, then ``to_empty`` and the base model's weights: the adapters, the
    modality embedding and the neck (which no base checkpoint holds) start from their init, the adapters as
    the identity, as when patched on a device. They held whatever the memory did (NaN here), which HF's
    init_weights does not reach (the up-projections are plain parameters): a NaN loss, or finite garbage."""
    from transformers import LlavaForConditionalGeneration

    from tiny_models import llava_config

    base = build("llava")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config())
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(neck=neck), verbose=False)
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: (lambda e: e.fill_(float("nan")) if e.is_floating_point()
                                                              else e)(empty_like(t, **kw)))
    model.to_empty(device="cpu")
    monkeypatch.undo()
    model.load_state_dict(base.state_dict(), strict=False)
    for name, buf in base.named_buffers():  # (the non-persistent ones, which from_pretrained would make)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buf.clone()
    assert [n for n, p in model.named_parameters() if not p.isfinite().all()] == []
    adapters = [m for m in model.modules() if isinstance(m, mmfast.MMAdapter)]
    assert adapters and all(not a.up_weight.any() and not a.up_bias.any() for a in adapters)
    assert all(torch.equal(a.down.bias, torch.zeros_like(a.down.bias)) for a in adapters)
    if not neck:  # identity adapters: the base model's loss
        inputs = batch("llava", images=[True, False])
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).loss, base(**inputs).loss, rtol=1e-6, atol=1e-6)


def test_load_trainable_refuses_adapters_of_other_options(tmp_path):
    """The adapters' weights do not show a temperature or scale: loaded into adapters made with others they
    computed other outputs without a word. The file records the options; dropout (training's) may differ."""
    model = build("llava")
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0, temperature=5.0, scale=2.0), verbose=False)
    _perturb_adapters(model)
    path = tmp_path / "mma.safetensors"
    mmfast.save_trainable(model, path)
    other = build("llava")
    mmfast.patch(other, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"MMAOptions.scale: saved with 2.0.*\n.*MMAOptions.temperature"):
            mmfast.load_trainable(other, path, strict=strict)
    same = build("llava")  # (neck_dim sizes nothing without a neck: another one is the same adapters)
    mmfast.patch(same, tuning="mma", mma=mmfast.MMAOptions(dropout=0.3, temperature=5.0, scale=2.0, neck_dim=64),
                 verbose=False)
    mmfast.load_trainable(same, path)
    mmfast.patch(same, tuning="mma", mma=mmfast.MMAOptions(dropout=0.3, temperature=5.0, scale=2.0), verbose=False)
    inputs = batch("llava", images=[True, False])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, same.eval()(**inputs).logits)


def test_save_trainable_records_numpy_options_as_the_numbers_they_hold(tmp_path):
    """Options given as NumPy numbers (a sweep's values, say; ``np.float32`` is no Python float) are recorded in
    the file's metadata as the numbers they hold: the save raised json's TypeError, and wrote nothing. The file
    loads into adapters of those options, and is refused by adapters of others."""
    import json

    import numpy as np
    from safetensors import safe_open

    opts = dict(dropout=0.0, temperature=np.float32(5.0), scale=np.float32(2.0))
    model = build("llava")
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(**opts), verbose=False)
    _perturb_adapters(model)
    path = tmp_path / "mma.safetensors"
    mmfast.save_trainable(model, path)
    with safe_open(str(path), framework="pt") as f:
        recorded = json.loads(f.metadata()["mma_options"])
    assert recorded["temperature"] == 5.0 and recorded["scale"] == 2.0
    same = build("llava")
    mmfast.patch(same, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0, temperature=5.0, scale=2.0), verbose=False)
    mmfast.load_trainable(same, path)
    other = build("llava")
    mmfast.patch(other, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0, temperature=5.0), verbose=False)
    with pytest.raises(ValueError, match=r"MMAOptions.scale: saved with 2.0, the model's adapters have 1.0"):
        mmfast.load_trainable(other, path)


def test_peft_prefix_tuning_routes_each_batch_by_its_own_images():
    """PEFT's prefix tuning hands every forward a KV cache already holding its virtual tokens: each training
    forward was taken for a decode step and kept the previous batch's image flags (a text-only sample routed
    as image). A whole sequence over a cache this model did not fill routes by its own image tokens."""
    from peft import PrefixTuningConfig, get_peft_model

    def model():
        peft = get_peft_model(build("llava"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        mmfast.patch(peft, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)
        _perturb_adapters(peft)
        return peft.eval()

    first, second = batch("llava", seed=1, images=[True, True]), batch("llava", seed=2, images=[False, True])
    used, fresh = model(), model()
    with torch.no_grad():
        used(**first)
        after = used(**second).logits
        alone = fresh(**second).logits
    assert torch.equal(after, alone)


def test_a_norm_copied_after_mma_says_how_to_order_peft():
    """PEFT's modules_to_save copies a norm with its MMA hook, whose adapter copy is no part of the model; the
    error says to wrap with PEFT first."""
    from peft import LoraConfig, get_peft_model

    model = _mma("llama")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["input_layernorm"]))
    with pytest.raises(RuntimeError, match="call get_peft_model first, then mmfast.patch"):
        peft(**batch("llama"))


def test_a_layernorm_recipe_over_mma_is_refused():
    model = _mma()
    with pytest.raises(ValueError, match="MMA adapters"):
        mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    assert any(p.requires_grad for n, p in model.named_parameters() if "mma" in n)  # nothing changed
    mmfast.unpatch(model)
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    assert not any("mma" in n for n, _ in model.named_parameters())


def test_unpatch_removes_mma():
    model = build("llava")
    pristine = copy.deepcopy(model)
    mmfast.patch(model, tuning="mma", verbose=False)
    mmfast.patch(model, tuning="mma", verbose=False)  # idempotent: no second set of adapters
    assert sum(n.endswith(ADAPTER_NAME) for n, _ in model.named_modules()) == 2 + 1  # tower layer 1 is not read
    assert sum(n.endswith(EMBEDDING_NAME) for n, _ in model.named_modules()) == 1
    import gc
    import weakref

    adapter = weakref.ref(model.model.language_model.layers[0].mma_adapter)
    mmfast.unpatch(model)
    gc.collect()
    assert adapter() is None  # (nothing the model keeps, a norm's slot included, holds the removed adapters)
    assert not any("mma" in n for n, _ in model.named_parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert repr(model) == repr(pristine)
    inputs = batch("llava", images=[True, False])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, pristine(**inputs).logits)


def test_mma_errors():
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(ValueError, match="neither"):
        mmfast.patch(GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32)), tuning="mma", verbose=False)
    with pytest.raises(ValueError, match="tuning='mma'"):
        mmfast.patch(build("llama"), tuning="layernorm-simp", mma=mmfast.MMAOptions(), verbose=False)
    with pytest.raises(ValueError, match="has none"):  # a neck replaces a projector
        mmfast.patch(build("llama"), tuning="mma", mma=mmfast.MMAOptions(neck=True), verbose=False)
    with pytest.raises(ValueError, match="neck_dim"):
        mmfast.patch(build("llava"), tuning="mma", mma=mmfast.MMAOptions(neck=True, neck_dim=0), verbose=False)
    model = _mma()
    with pytest.raises(ValueError, match="mma_has_image has 1 entries for a batch of 2$"):
        model(**batch("llava", B=2), mma_has_image=torch.tensor([True]))
    # a list, which generate does not repeat for its beams: said so
    inputs = batch("llava", B=1)
    inputs.pop("labels")
    with pytest.raises(ValueError, match="1 entries for a batch of 2 .generate repeats tensor arguments"):
        model.generate(**inputs, mma_has_image=[True], num_beams=2, max_new_tokens=1)


# the interpreter's bf16 tensor-core products are unusable (the adapter kernel's tests take fp16 there)
LOW = torch.bfloat16 if torch.cuda.is_available() else torch.float16
#: Independent input draws pooled (model_accuracy.assert_model_accurate_over_draws): the fused kernels round
#: differently from PyTorch, so one draw's loss error is one sample of a wide distribution for each. Over 30
#: fp16 draws the two mean errors agree (1.56e-5 vs 1.31e-5), but the max of 8 fell past 2x PyTorch's in
#: 1 run of 10; fp32's 8 draws failed none of 18
DRAWS = {torch.float32: 8, LOW: 24}


@pytest.mark.parametrize("dtype", [torch.float32, LOW], ids=str)
def test_mma_model_accurate_against_float64(seed, dtype, device, monkeypatch):
    """A whole MMA-tuned LLaVA (fused norms, adapters, MLP gates and loss) against the same model in
    float64 and against PyTorch in ``dtype``, both of which ``mmfast.disabled()`` runs: the adapters
    there take the LaVIN-style eager composition, so the float64 oracle can run at all."""
    import mmfast.nn.adapter as adapter_module
    from model_accuracy import assert_model_accurate_over_draws, double_inputs, run_model
    from spy import count_calls

    model = build("llava", seed, dtype=dtype).to(device)
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)
    _perturb_adapters(model, seed)
    ref64 = copy.deepcopy(model).double()
    with pytest.raises(TypeError, match=r"mmfast\.disabled\(\)"):  # (on the model's device: a GPU run's too)
        ref64(**double_inputs({k: v.to(device) for k, v in batch("llava", seed, images=[True, False],
                                                                  dtype=dtype).items()}))
    calls = count_calls(monkeypatch, adapter_module, "mma_adapter")
    draws = []
    for i in range(DRAWS[dtype]):
        inputs = {k: v.to(device) for k, v in batch("llava", seed + i, images=[True, False], dtype=dtype).items()}
        ours = run_model(model, inputs)
        assert calls, "the patched model did not run the fused adapter"
        calls.clear()
        with mmfast.disabled():
            lowp = run_model(model, inputs)
            ref = run_model(ref64, double_inputs(inputs))
        assert not calls, "mmfast.disabled() still ran the fused adapter"
        draws.append((ours, lowp, ref))
    assert any("mma_adapter" in n for n in draws[0][0][2])
    assert_model_accurate_over_draws(draws, seed)


def test_trainer_keeps_the_has_image_column(tmp_path):
    """HF Trainer drops batch keys its model's forward signature does not name (remove_unused_columns, on
    by default): mma_has_image, taken by a hook, was dropped and routing fell back to the image tokens.
    The patched forward's signature names it now; unpatch takes it away again."""
    import inspect

    from transformers import Trainer, TrainingArguments

    model = _mma()
    assert "mma_has_image" in inspect.signature(model.forward).parameters
    b = batch("llava", images=[True, False])
    flags = torch.tensor([False, False])  # said explicitly: no sample routes as image
    rows = [{**{k: v[i] for k, v in b.items() if k != "pixel_values"}, "mma_has_image": flags[i]} for i in range(2)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    got = next(iter(trainer.get_train_dataloader()))
    assert "mma_has_image" in got and got["mma_has_image"].tolist() == [False, False]
    mmfast.unpatch(model)
    assert "mma_has_image" not in inspect.signature(model.forward).parameters


@pytest.mark.parametrize("key", ["mm_encoder_outputs", "image_embeds"])
def test_images_encoded_ahead_after_a_cached_prefix_route_as_image(monkeypatch, key):
    """Chunked prefill hands the later chunks the image encoder's outputs, not pixel_values: a chunk that
    brings them with image tokens routes those samples as image samples (it took only pixel_values* as
    images, and routed them as text without a word)."""
    import types

    from mmfast.tuning import mma

    monkeypatch.setattr("mmfast.ops.backend._warned", set())
    image = 7
    state = mma._State(has_image=torch.tensor([False, False]))
    cache = types.SimpleNamespace(get_seq_length=lambda: 4)  # filled by a text-only prefill
    setattr(cache, mma.CACHE_FLAGS_ATTR, torch.tensor([False, False]))
    ids = torch.tensor([[1, image, image], [1, 2, 3]])
    with pytest.warns(RuntimeWarning, match="cached text prefix"):
        mma._top_pre_hook(state, _top_with_image_token(image), (), {"input_ids": ids, "cache": cache, key: object()})
    assert state.has_image.tolist() == [True, False]
    assert getattr(cache, mma.CACHE_FLAGS_ATTR).tolist() == [True, False]  # and from then on
    for empty in (None, {}):  # without images (generate passes {}): a sampled image-token id merges nothing
        setattr(cache, mma.CACHE_FLAGS_ATTR, torch.tensor([False, False]))
        mma._top_pre_hook(state, _top_with_image_token(image), (), {"input_ids": ids, "cache": cache, key: empty})
        assert state.has_image.tolist() == [False, False]


def test_a_reused_input_object_is_a_new_forward():
    """Forwards without grad on the same inputs_embeds object, with other routing: each routes as asked
    (the second took the first's route at layer 0, the same object being taken for a checkpoint recompute)."""
    model = _mma("llama")
    _perturb_adapters(model)
    model.eval()
    embeds = model.get_input_embeddings()(batch("llama")["input_ids"])
    with torch.no_grad():
        model(inputs_embeds=embeds, mma_has_image=torch.tensor([True, True]))
        again = model(inputs_embeds=embeds, mma_has_image=torch.tensor([False, False])).logits
        fresh = model(inputs_embeds=embeds.clone(), mma_has_image=torch.tensor([False, False])).logits
    assert torch.equal(again, fresh)


def test_gemma3_rotary_embedding_per_layer_type():
    """Gemma 3's rotary embedding takes the layer's attention type: the modality pass gives each layer the
    one of its type (every forward raised a TypeError after patching), and the adapters run."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=64,
                           sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(cfg)
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)
    _perturb_adapters(model)
    ids = torch.randint(0, 64, (2, 10))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "mma" in n)
    with mmfast.disabled(), torch.no_grad():  # the adapters' eager composition
        torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, out.loss.detach())


@pytest.mark.parametrize("kind,fused_loss", [("llava", False), ("granite", True)])
def test_has_image_is_named_where_the_fused_loss_is_off(kind, fused_loss, tmp_path):
    """Without the fused loss's forward (fused_loss=False, or a family it does not know) the signature
    named no mma_has_image: HF Trainer dropped the column (routing then silently followed the image tokens,
    or said text only) and generate refused the keyword. A pass-through forward names it now; a later
    patch with the fused loss replaces it, and unpatch removes it."""
    import inspect

    if kind == "granite":  # (its forward scales the logits: not one the fused loss knows)
        from transformers import GraniteConfig, GraniteForCausalLM

        torch.manual_seed(0)
        model = GraniteForCausalLM(GraniteConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    else:
        model = build(kind)
    before = inspect.signature(model.forward)
    report = mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), fused_loss=fused_loss,
                          verbose=False)
    assert report.fused_loss != "on"
    sig = inspect.signature(model.forward)
    assert "mma_has_image" in sig.parameters and set(before.parameters) < set(sig.parameters)
    _perturb_adapters(model)
    model.eval()
    ids = torch.randint(1, 30, (2, 6))
    with torch.no_grad():
        as_image = model(input_ids=ids, mma_has_image=torch.tensor([True, True])).logits
        out = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, mma_has_image=torch.tensor([True, True]))
    assert out.shape == (2, 8)
    with torch.no_grad():
        assert not torch.equal(as_image, model(input_ids=ids).logits)  # the flag reached the routing
    # patched again without a tuning (the adapters stay): still named (a re-patch dropped it)
    mmfast.patch(model, fused_loss=fused_loss, verbose=False)
    assert "mma_has_image" in inspect.signature(model.forward).parameters
    # a wrapper put around the forward since is kept by a re-patch (the pass-through was re-installed under it)
    calls = []
    inner = model.forward
    model.forward = lambda *a, **k: calls.append(1) or inner(*a, **k)
    mmfast.patch(model, fused_loss=fused_loss, verbose=False)
    with torch.no_grad():
        model(input_ids=ids)
    assert calls == [1]
    del model.forward
    if kind == "llava":
        mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)  # fused loss on now
        assert "mma_has_image" in inspect.signature(model.forward).parameters
    mmfast.unpatch(model)
    assert inspect.signature(model.forward) == before and "forward" not in model.__dict__


def test_has_image_is_named_behind_an_accelerate_hook():
    """A model behind an Accelerate hook (device_map loading): signature lookups follow the hook's
    ``__wrapped__``, which kept pointing at the class's forward, so mma_has_image was not named (Trainer
    dropped it). It points at the patched forward while patched; unpatch puts it back."""
    import inspect

    from accelerate.hooks import ModelHook, add_hook_to_module

    model = build("llava")
    add_hook_to_module(model, ModelHook())
    before = inspect.signature(model.forward)
    mmfast.patch(model, tuning="mma", verbose=False)
    assert "mma_has_image" in inspect.signature(model.forward).parameters
    out = model(**batch("llava", images=[True, False]), mma_has_image=torch.tensor([False, False]))
    assert out.loss is not None
    mmfast.unpatch(model)
    assert inspect.signature(model.forward) == before


def test_the_image_token_id_is_read_at_every_call():
    """An image token added after patching (``resize_token_embeddings``, then ``config.image_token_id``):
    LLaVA merges the images at the new id, and MMA, which had kept the id of patch time, routed every
    sample as text."""
    from tiny_models import IMAGE_TOKEN, VOCAB

    model = _mma()
    _perturb_adapters(model)
    inputs = batch("llava", images=[True, False])
    with torch.no_grad():
        ref = model(**inputs).logits
    model.resize_token_embeddings(VOCAB + 8)
    with torch.no_grad():  # the old id's embedding row, at the new id
        emb = model.get_input_embeddings().weight
        emb[VOCAB + 3] = emb[IMAGE_TOKEN]
    model.config.image_token_id = VOCAB + 3
    moved = dict(inputs, input_ids=torch.where(inputs["input_ids"] == IMAGE_TOKEN, VOCAB + 3, inputs["input_ids"]))
    with torch.no_grad():
        logits = model(**moved).logits
    assert model.__dict__["_mmfast_mma_state"].has_image.tolist() == [True, False]
    assert torch.equal(logits[..., :VOCAB], ref[..., :VOCAB])


def _trained_mma_llama():
    model = build("llama").eval()
    mmfast.patch(model, tuning="mma", verbose=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "mma" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_mma_patched_after_accelerate_offloading():
    """cpu_offload, then tuning="mma": the adapters and the modality embedding were made on the meta device
    (where the offloaded weights wait between forwards), never initialised, and the forward failed. They
    are made on the hooks' execution device now, resident there."""
    from accelerate import cpu_offload

    trained = _trained_mma_llama()
    inputs = {k: v for k, v in batch("llama").items() if k != "labels"}
    with torch.no_grad():
        ref = trained(**inputs).logits
    model = build("llama").eval()
    cpu_offload(model, execution_device="cpu")
    mmfast.patch(model, tuning="mma", verbose=False)
    added = {n: p for n, p in model.named_parameters() if "mma" in n}
    assert added and all(p.device.type == "cpu" for p in added.values())
    assert model.model.layers[0].input_layernorm.weight.is_meta  # the offloaded weights stay offloaded
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "mma" in n:
                added[n].copy_(p)
        assert torch.equal(model(**inputs).logits, ref)


def test_an_mma_model_offloaded_after_patching():
    """A trained MMA model offloaded for inference: the adapter reads its down-projection's weights
    without calling it, so the offload hook on it never loaded them (the op got meta weights)."""
    from accelerate import cpu_offload

    model = _trained_mma_llama()
    inputs = {k: v for k, v in batch("llama").items() if k != "labels"}
    with torch.no_grad():
        ref = model(**inputs).logits
    cpu_offload(model, execution_device="cpu")
    down = model.model.layers[0].mma_adapter.down
    assert down.weight.is_meta
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    assert down.weight.is_meta  # and offloaded again after the call


def test_video_llava_leaves_each_towers_unread_layers_without_adapters():
    """Video-LLaVA has an image and a video tower: the cut after ``vision_feature_layer`` went by the
    count of all vision layers, which did not match one tower's, so every layer got an adapter (the
    unread ones never get a gradient: DDP stops on them) and the report named none. Per tower now."""
    import transformers as T

    clip = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, image_size=16, patch_size=8, projection_dim=16)
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, pad_token_id=0)
    torch.manual_seed(0)
    model = T.VideoLlavaForConditionalGeneration(T.VideoLlavaConfig(
        vision_config=clip, text_config=text, image_token_index=127, video_token_index=126, vision_feature_layer=-2))
    report = mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)
    towers = sorted(a for a in report.adapters if "tower" in a)
    assert towers == ["model.image_tower.encoder.layers.0.mma_adapter", "model.video_tower.encoder.layers.0.mma_adapter"]
    skipped = sorted(p for p, why in report.skipped if "vision_feature_layer" in why)
    assert skipped == ["model.image_tower.encoder.layers.1", "model.video_tower.encoder.layers.1"]
    _perturb_adapters(model)
    ids = torch.randint(1, 100, (2, 10))
    ids[:, 1:5] = 127
    model.train()
    model(input_ids=ids, pixel_values_images=torch.randn(2, 3, 16, 16), labels=ids.masked_fill(ids == 127, -100)
          ).loss.backward()
    assert model.model.image_tower.encoder.layers[0].mma_adapter.up_weight.grad.abs().sum() > 0


def test_mma_refuses_a_decoder_with_cross_attention_layers():
    """Mllama's cross-attention layers need the image states, which the modality pass has none of: patch
    accepted the model and every forward then failed with a TypeError about missing arguments. It is
    refused when patching now, with the model unchanged."""
    import transformers as T

    vc = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4, intermediate_size=64,
              vision_output_dim=64, image_size=16, patch_size=8, max_num_tiles=1, intermediate_layers_indices=[0],
              supported_aspect_ratios=[[1, 1]])
    tc = dict(model_type="mllama_text_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=128, cross_attention_layers=[1],
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = T.MllamaForConditionalGeneration(T.MllamaConfig(vision_config=vc, text_config=tc, image_token_index=127))
    before = repr(model)
    with pytest.raises(ValueError, match=r"layers \[1\] are cross-attention layers"):
        mmfast.patch(model, tuning="mma", verbose=False)
    assert repr(model) == before and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", ["Gemma4", "Gemma3n"])
def test_decoders_whose_layers_need_the_whole_forward_are_refused(family):
    """Gemma 4's and Gemma 3n's decoder layers take per-layer inputs (computed from the token ids) and the keys
    and values a layer shares with later ones, which the modality pass cannot give a token alone: patch
    accepted them and every forward failed inside the attention (Gemma 4: a TypeError on the shared states'
    dict). Refused when patching now, with the model unchanged."""
    import transformers as T

    if not hasattr(T, f"{family}ForCausalLM"):
        pytest.skip(f"transformers {T.__version__} has no {family}")
    shape = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=64, sliding_window=4,
                 layer_types=["sliding_attention", "full_attention"])
    if family == "Gemma4":
        cfg = T.Gemma4TextConfig(**shape, global_head_dim=8, hidden_size_per_layer_input=0)
    else:
        cfg = T.Gemma3nTextConfig(**shape, vocab_size_per_layer_input=64, hidden_size_per_layer_input=8, laurel_rank=4,
                                  num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0])
    model = getattr(T, f"{family}ForCausalLM")(cfg)
    before = repr(model)
    # what the layer takes (transformers 5.0's Gemma 3n layer shares no keys and values yet)
    takes = [n for n in ("per_layer_input", "shared_kv_states")
             if n in inspect.signature(type(model.model.layers[0]).forward).parameters]
    assert "per_layer_input" in takes
    with pytest.raises(ValueError, match=rf"DecoderLayer takes {' and '.join(takes)}, which"):
        mmfast.patch(model, tuning="mma", verbose=False)
    assert repr(model) == before and all(p.requires_grad for p in model.parameters())


def test_a_bert_style_text_decoder_is_refused():
    """BLIP's text decoder is BERT-style (no LLaMA-style layers) and its model hands out no output embeddings:
    MMA took it for a vision tower alone and trained adapters in the tower only. Refused, as the LayerNorm
    recipes refuse it."""
    import transformers as T

    cfg = T.BlipConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        vocab_size=64),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=28, patch_size=14), projection_dim=32)
    model = T.BlipForConditionalGeneration(cfg)
    before = repr(model)
    with pytest.raises(ValueError, match="no LLaMA-style decoder layers .* vision tower alone"):
        mmfast.patch(model, tuning="mma", verbose=False)
    assert repr(model) == before and all(p.requires_grad for p in model.parameters())


def _train_step_as_eager(run, model, ref, ref_loss, inputs, grad_rtol):
    """One training step through ``run`` (``model``, compiled some way): its loss and every trainable
    gradient equal those of ``ref``, the same model run eager."""
    model.zero_grad()
    loss = run(**inputs).loss
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=grad_rtol, atol=1e-6, msg=name)


def _compile_layers_one_by_one(layer_lists, graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for layers in layer_lists:
        for layer in layers:
            layer.compile(backend=backend)


@pytest.mark.parametrize("patched_first", [False, True], ids=["mma", "patched-then-mma"])
def test_layers_compiled_one_by_one_share_one_code_and_keep_their_own_adapters(patched_first):
    """Layers compiled one by one (``layer.compile()``, Accelerate's regional compilation). The hooks bound
    each layer's adapter and index, and torch.compile does not guard hooks: compiled code traced through one
    layer's hooks ran for the next (the norms that carried them were given forwards guarded by identity
    to stop that, so every layer compiled again, and past the recompile limit, 8, the others ran
    uncompiled, silently). Layers route as eager, forward and backward, called twice (the second call
    reuses compiled code), and a model of 6 + 6 layers compiles no more often than one of 4 + 4 (the
    decoder's two passes, the modality token's and the sequence's; the vision layer whose output is not
    read, without an adapter; the first layers, whose input needs no grad)."""
    from transformers import LlavaForConditionalGeneration

    from tiny_models import clip_vision_config, llama_config, llava_config

    def make(n):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(llava_config(text=llama_config(num_hidden_layers=n),
                                                           vision=clip_vision_config(num_hidden_layers=n)))
        if patched_first:
            mmfast.patch(model, verbose=False)
        mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)
        _perturb_adapters(model)
        return model

    inputs = batch("llava", images=[True, False])
    inputs.update(labels=inputs["input_ids"], use_cache=False)

    def compiles(n):
        ref = make(n)
        ref_loss = ref(**inputs).loss
        ref_loss.backward()
        model = make(n)
        graphs = []
        torch._dynamo.reset()
        _compile_layers_one_by_one([model.model.language_model.layers, model.model.vision_tower.encoder.layers],
                                   graphs)
        try:
            # a compile per layer is counted past the default limit (8), which 4 layers' two passes reach
            with torch._dynamo.config.patch(recompile_limit=64):
                for _ in range(2):
                    _train_step_as_eager(model, model, ref, ref_loss, inputs, grad_rtol=1e-5)
        finally:
            torch._dynamo.reset()
        return len(graphs)

    assert compiles(6) == compiles(4)



def test_siglip_layers_compiled_one_by_one_route_from_their_own_tokens():
    """The same for a tower routed by the mean of its tokens (a pre-hook on the layer hands its norm's hook
    the tokens the attention mask leaves in): every layer its own adapter, compiled once."""
    model = _perturbed_mma_tower(build("siglip-vision"))
    model.encoder.layers.extend([copy.deepcopy(layer) for layer in model.encoder.layers] * 4)  # 10 layers
    _perturb_adapters(model, seed=3)
    pix = batch("siglip-vision", seed=8, B=3)["pixel_values"]
    with torch.no_grad():
        ref = model(pixel_values=pix).last_hidden_state
    graphs = []
    torch._dynamo.reset()
    _compile_layers_one_by_one([model.encoder.layers], graphs)
    try:
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(model(pixel_values=pix).last_hidden_state, ref, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1


def test_a_model_pickled_with_the_earlier_hooks_runs_as_before():
    """A model pickled by an earlier version carries hooks that bound each layer's adapter and index (and a
    routing state that held the routes): it unpickles and runs as a model patched now, forward and backward."""
    import functools
    import pickle

    from mmfast.tuning import mma

    model = _mma()
    _perturb_adapters(model)
    old = copy.deepcopy(model)
    state = old.__dict__[mma._STATE]
    decoder = old.model.language_model
    for m in old.modules():
        mma.remove_hooks(m, mma._ours)
        for key in (mma._SLOT, mma._STATE):
            m.__dict__.pop(key, None)
    old.__dict__[mma._STATE] = state
    state.__dict__["routes"] = {}
    for i, layer in enumerate(decoder.layers):
        layer.input_layernorm.register_forward_hook(functools.partial(mma._llm_norm_hook, state, i, layer.mma_adapter))
    decoder.register_forward_pre_hook(functools.partial(mma._llm_pre_hook, state), with_kwargs=True)
    old.register_forward_pre_hook(functools.partial(mma._top_pre_hook, state), with_kwargs=True)
    for layer in old.model.vision_tower.encoder.layers:
        if hasattr(layer, "mma_adapter"):
            layer.layer_norm1.register_forward_hook(functools.partial(mma._vision_norm_hook, layer.mma_adapter))
    old = pickle.loads(pickle.dumps(old))
    assert "routes" not in old.__dict__[mma._STATE].__dict__
    inputs = batch("llava", images=[True, False])
    inputs["labels"] = inputs["input_ids"]
    want, got = model(**inputs), old(**inputs)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    want.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(model.named_parameters(), old.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    assert mmfast.unpatch(old) and not any(mma._SLOT in m.__dict__ for m in old.modules())


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"])
def test_compiled_whole_trains_as_eager_without_compiling_per_layer_or_per_step(checkpointing):
    """The whole model compiled. Each layer's routing asked autograd whether a backward was running, which
    torch.compile cannot trace: the graph broke in every layer, each layer resumed with its own index
    (compiled again per layer), and under activation checkpointing it compiled again every step. Training
    steps give the eager loss and gradients; a model of 3 layers compiles no more often than one of 2,
    and the second step not at all."""
    from transformers import LlavaForConditionalGeneration

    from tiny_models import llama_config, llava_config

    def make(n):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(llava_config(text=llama_config(num_hidden_layers=n)))
        mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)
        _perturb_adapters(model)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        return model.train()

    inputs = batch("llava", images=[True, False])
    inputs.update(labels=inputs["input_ids"])

    def compiles(n):
        ref = make(n)
        ref_loss = ref(**inputs).loss
        ref_loss.backward()
        model = make(n)
        graphs, counts = [], []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        try:
            with torch._dynamo.config.patch(recompile_limit=64):  # a compile per layer counted past the limit, 8
                for _ in range(2):
                    _train_step_as_eager(compiled, model, ref, ref_loss, inputs, grad_rtol=1e-4)
                    counts.append(len(graphs))
        finally:
            torch._dynamo.reset()
        assert counts[1] == counts[0], counts
        return counts[0]

    assert compiles(3) == compiles(2)


def test_a_forward_without_grad_compiles_whole():
    """Routing an evaluation forward breaks no graph (each layer asked autograd whether a backward was
    running, which torch.compile cannot trace): ``fullgraph=True`` compiles it, with the eager logits."""
    model = _mma("llama")
    _perturb_adapters(model)
    model.eval()
    inputs = batch("llama", images=None)
    inputs["use_cache"] = False
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = model(**inputs).logits
            compiled = torch.compile(model, backend="eager", fullgraph=True)(**inputs).logits
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_a_static_cache_decode_step_compiles_whole():
    """A static cache's length is a tensor, and routing branched on it: every compiled decode step broke its
    graph, and ``fullgraph=True`` (generate's ``CompileConfig``) failed. Both routings are taken and one is
    picked in the graph: generate compiles whole, and a decode step that is handed no flags keeps the
    prefill's, as in eager code."""
    from transformers import CompileConfig, StaticCache

    from mmfast.tuning.mma import CACHE_FLAGS_ATTR

    model = _plainly_routed("llama")
    inputs = batch("llama", images=None)
    inputs.pop("labels")
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    flags = torch.tensor([True, False])
    kw = dict(max_new_tokens=3, do_sample=False, cache_implementation="static", return_dict_in_generate=True,
              output_logits=True, mma_has_image=flags)
    config = CompileConfig(fullgraph=True, backend="eager")
    config._compile_all_devices = True  # generate compiles on a GPU only otherwise
    ids = inputs["input_ids"]
    S = ids.shape[1]

    cache_kw = _cache_kw(model)

    def decode_step(step, **step_flags):  # an eager prefill with flags, then a step (without them)
        cache = StaticCache(config=model.config, max_cache_len=S + 1)
        model(input_ids=ids, **{cache_kw: cache}, mma_has_image=flags, use_cache=True)
        stored = getattr(cache, CACHE_FLAGS_ATTR)
        logits = step(input_ids=ids[:, -1:], **{cache_kw: cache}, use_cache=True,
                      position_ids=torch.full((2, 1), S), **step_flags).logits
        # a compiled step leaves the prefill's flags on the cache (under CUDA graphs its own output, read back
        # by the next step, would be overwritten by it)
        assert step_flags or getattr(cache, CACHE_FLAGS_ATTR) is stored
        return logits

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = model.generate(**inputs, **kw).logits
            compiled = model.generate(**inputs, **kw, compile_config=config).logits
            step_eager = decode_step(model)
            step_compiled = decode_step(torch.compile(model, backend="eager", fullgraph=True))
            step_text = decode_step(model, mma_has_image=torch.tensor([False, False]))
    finally:
        torch._dynamo.reset()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step_compiled, step_eager, rtol=1e-5, atol=1e-5)
    assert (step_eager[0] - step_text[0]).abs().max() > 1e-4  # the routing shows (3e-3 here; 10x the above)
    torch.testing.assert_close(step_eager[1], step_text[1], rtol=0, atol=0)


def test_a_decoder_layer_removed_after_patching_trains_and_is_freed():
    """Pruning after patching (``del layers[k]``): the routes were taken from a list of every layer's slot kept
    since patching, so the removed layer's empty route failed the training step and its adapter stayed alive;
    they are the slots of the layers the decoder has at each forward."""
    import gc
    import weakref

    from transformers import LlamaForCausalLM

    from tiny_models import llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(num_hidden_layers=3))
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)
    _perturb_adapters(model)
    removed = weakref.ref(model.model.layers[2].mma_adapter)
    gc.collect()
    gc.disable()
    try:
        del model.model.layers[2]
        assert removed() is None
    finally:
        gc.enable()
    inputs = batch("llama")
    inputs["labels"] = inputs["input_ids"]
    model(**inputs).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_accelerate_regional_compilation_of_an_mma_model_says_it_compiles_nothing():
    """Accelerate's compile_regions makes a shallow copy of the model holding compiled copies of its layers;
    an MMA model's forward (the signature pass-through that names ``mma_has_image``) runs the original
    model, so nothing compiled runs: it says so (it was silent), and the results are the eager ones."""
    import warnings

    import accelerate.utils

    from mmfast.ops import backend as ops_backend

    compile_regions = getattr(accelerate.utils, "compile_regions", None)
    if compile_regions is None:
        pytest.skip("this Accelerate has no regional compilation")
    model = _mma()
    _perturb_adapters(model)
    inputs = batch("llava", images=[True, False])
    with torch.no_grad():
        ref = model(**inputs, use_cache=False).logits
    ops_backend._warned.discard("mma-shallow-copy")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model(**inputs, use_cache=False)  # the model itself does not warn
    torch._dynamo.reset()
    try:
        copied = compile_regions(model, backend="eager")
        with pytest.warns(RuntimeWarning, match="shallow copy of a patched MMA model"), torch.no_grad():
            out = copied(**inputs, use_cache=False).logits
    finally:
        torch._dynamo.reset()
        ops_backend._warned.discard("mma-shallow-copy")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _phi4_multimodal():
    """A tiny Phi-4-multimodal (its language model merges the images into its own embeddings) and a batch
    of two samples with an image each."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.Phi4MultimodalConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=128,
        original_max_position_embeddings=128,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8, crop_size=32, image_token_id=127, feature_layer=-2),
        audio_config=dict(hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=4,
                          ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=32,
                          audio_token_id=126))
    model = T.Phi4MultimodalForCausalLM(cfg)
    tokens = 2 * 2 * 3 + 1  # a global and a sub-image crop of 2 x (2 + 1) tokens each, and a separator
    ids = torch.randint(3, 100, (2, tokens + 5))
    ids[:, 1:1 + tokens] = 127
    inputs = dict(input_ids=ids, image_pixel_values=torch.randn(2, 2, 3, 32, 32),
                  image_sizes=torch.tensor([[32, 32]] * 2), image_attention_mask=torch.ones(2, 2, 4, 4, dtype=torch.long))
    return model, inputs


def _vision_adapter_grads(model) -> list:
    return [p.grad for n, p in model.named_parameters() if "mma_adapter.up_" in n and "embed_tokens_extend" in n]


def test_a_language_model_that_merges_the_images_itself_keeps_them():
    """Phi-4-multimodal's language model takes the token ids with the image inputs and merges the images into
    its embeddings itself. With grad on, MMA's routing looked the ids up in its place and handed the model
    embeddings without the images: training never saw an image and no vision adapter got a gradient. Its
    image token id is in its vision config only, so every sample was routed as text, too."""
    from mmfast.tuning.mma import _STATE

    model, inputs = _phi4_multimodal()
    ref = copy.deepcopy(model)
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)
    expected = ref(**inputs).logits  # fresh adapters are the identity
    torch.testing.assert_close(model(**inputs).logits, expected)  # (without the images: 0.57 apart)
    assert model.model.__dict__[_STATE].has_image.tolist() == [True, True]
    _perturb_adapters(model)
    model(**inputs).logits.square().mean().backward()
    grads = _vision_adapter_grads(model)
    assert len(grads) == 2 * 2  # the two SigLIP layers it reads (hidden state -2 of 3 layers), two experts each
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_merged_images_kept_when_the_input_embeddings_are_swapped_or_the_forward_fails():
    """The routes' gradient path goes on the lookup of the input embeddings module the model has at the call:
    one set since patching (set_input_embeddings, or PEFT's trainable tokens wrapping it) keeps the images
    and the vision adapters' gradients. A forward that fails before its lookup leaves nothing for a later
    lookup of the module to take, and a model that does not look its ids up through that module raises."""
    model, inputs = _phi4_multimodal()
    mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0), verbose=False)
    _perturb_adapters(model)
    replaced = copy.deepcopy(model.model.embed_tokens)
    model.model.set_input_embeddings(replaced)
    model(**inputs).logits.square().mean().backward()
    assert all(g is not None and g.abs().sum() > 0 for g in _vision_adapter_grads(model))

    def fail(module, args, kwargs):
        raise KeyError("a hook of the user's")

    handle = model.model.register_forward_pre_hook(fail, with_kwargs=True)
    with pytest.raises(KeyError, match="a hook of the user's"):
        model(**inputs)
    handle.remove()
    looked_up = replaced(inputs["input_ids"])  # the user's own lookup: a plain, frozen embedding
    assert looked_up.grad_fn is None  # (not the failed forward's routes' gradient bridge)

    unused = torch.nn.Embedding(128, 32)
    model.model.get_input_embeddings = lambda: unused
    with pytest.raises(RuntimeError, match="did not look its input_ids up with its input embeddings module"):
        model(**inputs)




def test_mma_again_on_a_frozen_model_trains_its_modules_again():
    """Patching twice is patching once: a second ``tuning="mma"`` after something froze the model
    (``requires_grad_(False)``, PEFT's prepare_model_for_kbit_training) left everything frozen, as the
    LayerNorm recipes do not (they set what trains again): the next training step had no gradient to
    compute. The adapters, the modality embedding and the projector train again."""
    model = build("llava")
    first = mmfast.patch(model, tuning="mma", verbose=False)
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert any("multi_modal_projector" in n for n in trained)
    model.requires_grad_(False)
    again = mmfast.patch(model, tuning="mma", verbose=False)
    assert again.trainable_params == first.trainable_params > 0
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trained
    model.train()
    model(**batch("llava")).loss.backward()
    assert all(model.get_parameter(n).grad is not None for n in trained)


def test_a_cast_after_mma_warns_and_patching_again_widens_it_back(recwarn):
    """MMA makes its adapters and modality embedding in fp32, as the LayerNorm recipes keep fp32 master
    norm weights; a cast after patching (Lightning's "bf16-true", ``model.half()``) made them 16-bit with
    nothing said, and a second patch left them so. A training forward warns once now, and patching again
    puts them back in fp32."""
    from mmfast.tuning.mma import added_modules

    model = build("llava")
    mmfast.patch(model, tuning="mma", verbose=False)
    model.to(torch.bfloat16)
    model.eval()
    with torch.no_grad():
        model(**batch("llava", dtype=torch.bfloat16))
    assert not [w for w in recwarn if "MMA adapters" in str(w.message)]
    model.train()
    for _ in range(2):
        model(**batch("llava", dtype=torch.bfloat16)).loss.backward()
    said = [str(w.message) for w in recwarn if "MMA adapters" in str(w.message)]
    assert len(said) == 1 and "bfloat16 now" in said[0] and "patching again" in said[0]
    mmfast.patch(model, tuning="mma", verbose=False)
    added = [model.get_submodule(n) for n in added_modules(model)]
    assert added and all(p.dtype == torch.float32 and p.requires_grad for m in added for p in m.parameters())
    model(**batch("llava", dtype=torch.bfloat16)).loss.backward()
    assert len([w for w in recwarn if "MMA adapters" in str(w.message)]) == 1


def test_a_dual_encoders_text_tower_gets_no_adapters():
    """CLIP's text tower is built of CLIP encoder layers too, but it is causal: MMA put adapters routed from the
    mean of every token there, so after training each token's state depended on later tokens (the per-token
    states Stable Diffusion conditions on). A dual encoder's adapters go into its vision tower only, and a text
    tower alone is refused."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    text = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                max_position_embeddings=16)
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=14)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    report = mmfast.patch(model, tuning="mma", verbose=False)
    assert report.adapters and all(a.startswith("vision_model.") for a in report.adapters)
    with pytest.raises(ValueError, match="neither a LLaMA-style language model nor CLIP/SigLIP encoder layers"):
        mmfast.patch(CLIPTextModel(CLIPTextConfig(**text)), tuning="mma", verbose=False)


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_backward_recomputing_layers_while_another_threads_forward_records_its_routes(reentrant):
    """Activation checkpointing recomputes decoder layers in a backward (on autograd's own thread on a GPU)
    while a forward of the model on another thread runs its modality pass (a generate streaming beside a
    training loop): the recompute took the modality token's recording for its own (routing from its first
    token and overwriting the other forward's routes: wrong gradients without a word, or a misleading error,
    and the other forward's 'no modality route')."""
    import threading

    model = _mma()
    _perturb_adapters(model)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ref = copy.deepcopy(model)
    b = batch("llava", seed=1, images=[True, False])
    prompt = {"input_ids": batch("llava", seed=7, B=1, S=8, images=[False])["input_ids"]}
    ref(**b).loss.backward()
    with torch.no_grad():
        want = ref(**prompt).logits
    loss = model(**b).loss
    inside, go, got = threading.Event(), threading.Event(), {}

    def hold(*_):  # the other thread's modality pass, at layer 0
        if threading.current_thread() is not threading.main_thread() and not inside.is_set():
            inside.set()
            go.wait(30)

    def other():
        try:
            with torch.no_grad():
                got["logits"] = model(**prompt).logits
        except RuntimeError as e:
            got["error"] = e

    handle = model.model.language_model.layers[0].register_forward_hook(hold)
    thread = threading.Thread(target=other)
    thread.start()
    assert inside.wait(30)
    try:
        loss.backward()
    finally:
        go.set()
        thread.join()
        handle.remove()
    assert "error" not in got, got
    torch.testing.assert_close(got["logits"], want)
    _assert_grads_as(model, ref)


def _skip_unless_chunked_prefill_carries_images():
    """transformers before 5.23 hands a chunked prefill's forwards no image inputs (an unpatched LLaVA's chunked
    generate differs from its one pass there): nothing for the routing to match."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.23"):
        pytest.skip(f"transformers {transformers.__version__}'s chunked prefill drops the images (carried from 5.23)")


def test_generate_chunked_prefill_routes_by_the_whole_prompt():
    """generate(prefill_chunk_size=N) splits the prompt: a first chunk holding only the text before a sample's
    image routed that sample as text (with the warning of an image after a cached text prefix), so its tokens
    differed from the one-pass generate's. The whole prompt's image tokens route the prefill now."""
    from tiny_models import IMAGE_SIZE, IMAGE_TOKEN, IMAGE_TOKENS

    _skip_unless_chunked_prefill_carries_images()
    model = _plainly_routed()
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[5, 6, 7] + [IMAGE_TOKEN] * IMAGE_TOKENS + [8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]])
    pix = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    kw = dict(input_ids=ids, pixel_values=pix, max_new_tokens=4, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        one_pass = model.generate(**kw)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="mmfast MMA: image tokens arrived")
            chunked = model.generate(**kw, prefill_chunk_size=3)
        as_text = model.generate(**kw, mma_has_image=torch.tensor([False, False]))
    _assert_same_generation(chunked, one_pass)
    assert (as_text.logits[0][0] - one_pass.logits[0][0]).abs().max() > 1e-3  # the routing shows


@pytest.mark.parametrize("case", ["reset", "prefix", "foreign", "foreign-image"])
def test_generate_chunked_prefill_on_a_given_cache_routes_as_one_pass(case):
    """generate(prefill_chunk_size=N) with a cache the caller gives: one emptied by ``reset`` after an earlier
    use (its flags are stale: the wrapper left such a cache to the chunks, and a first chunk of text before
    the image routed the sample as text), one holding a text prefix (a prompt cache, a continued turn) that a
    new image follows, or a prefix this model did not fill (no flags), also one whose cached prefix holds the
    other sample's image (the new tokens route it: as text, as in one pass, not by the prefix's image
    tokens). Its tokens and logits match the one-pass generate's, which routes all the new tokens of an image
    sample as image."""
    from tiny_models import IMAGE_SIZE, IMAGE_TOKEN, IMAGE_TOKENS
    from transformers import DynamicCache

    from mmfast.tuning.mma import CACHE_FLAGS_ATTR

    _skip_unless_chunked_prefill_carries_images()
    model = _plainly_routed()
    g = torch.Generator().manual_seed(0)
    pix = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    prompt = torch.tensor([[5, 6] + [IMAGE_TOKEN] * IMAGE_TOKENS + [8, 9], [30, 31, 32, 33, 34, 35, 36, 37]])
    cache = DynamicCache(config=model.config.get_text_config())
    cache_kw = _cache_kw(model)
    with torch.no_grad():
        if case == "reset":
            model.generate(input_ids=prompt, pixel_values=pix, max_new_tokens=2, do_sample=False, pad_token_id=0,
                           **{cache_kw: cache})
            cache.reset()  # (its flags say row 0 has an image: stale for the next prompt's rows)
            ids = prompt.flip(0)
        else:
            prefix = torch.tensor([[21, 22, 23], [24, 25, 26]])
            images = {}
            if case == "foreign-image":
                prefix = torch.tensor([[21, 22, 23, 24, 25], [IMAGE_TOKEN] * IMAGE_TOKENS + [26]])
                images["pixel_values"] = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
            model(input_ids=prefix, use_cache=True, **{cache_kw: cache}, **images)
            if case.startswith("foreign"):
                del cache.__dict__[CACHE_FLAGS_ATTR]
            ids = torch.cat([prefix, prompt], 1)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix, max_new_tokens=3,
              do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one_pass = model.generate(**kw, **{cache_kw: copy.deepcopy(cache)})
        chunked = model.generate(**kw, **{cache_kw: copy.deepcopy(cache)}, prefill_chunk_size=2)
    _assert_same_generation(chunked, one_pass)


def test_generate_chunked_prefill_of_an_assistant_routes_as_unchunked():
    """An MMA model drafting for assisted decoding: the candidate generator's generate runs its prefill with
    is_first_iteration=False, whose forwards get no image inputs (so they route as text). The chunked
    prefill's routing by the whole prompt handed those forwards mma_has_image=True: the assistant's logits
    differed with prefill_chunk_size from those without it."""
    from tiny_models import IMAGE_SIZE, IMAGE_TOKEN, IMAGE_TOKENS
    from transformers import GenerationConfig

    model = _plainly_routed()
    ids = torch.tensor([[5, 6, 7] + [IMAGE_TOKEN] * IMAGE_TOKENS + [8, 9, 10]])
    pix = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))

    def draft(chunk):
        config = GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                                  output_scores=True, output_logits=True, prefill_chunk_size=chunk)
        config.is_assistant = True  # (as AssistedCandidateGenerator sets it)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.generate(input_ids=ids, pixel_values=pix, generation_config=config)

    one_pass, chunked = draft(None), draft(3)
    _assert_same_generation(chunked, one_pass)
