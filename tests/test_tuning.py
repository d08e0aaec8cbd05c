"""LayerNorm-tuning recipes: parameter selection, fp32 master weights, training in HF Trainer (with
gradient checkpointing), and the trainable state's save/load."""

import copy

import warnings

import pytest
import torch

import mmfast
from mmfast.tuning.recipes import remove_tuning_hooks
from tiny_models import IMAGE_TOKENS, batch, build, llama4_text_config, llava_7b_config

# ---------------------------------------------------------------------------------------------
# parameter selection on a LLaVA-1.5-7B-shaped model (meta device: no memory, no data)
# ---------------------------------------------------------------------------------------------

BLOCK_NORMS_7B = 2 * 32 * 4096
PROJECTOR_7B = (1024 * 4096 + 4096) + (4096 * 4096 + 4096)
EMBED_HEAD_7B = 2 * 32064 * 4096


@pytest.fixture(scope="module")
def llava_7b_meta():
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(llava_7b_config())


def build_meta_llava():
    from transformers import LlavaForConditionalGeneration

    from tiny_models import llava_config

    return LlavaForConditionalGeneration(llava_config())


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "tuning,final_norm,expected",
    [
        ("layernorm-simp", False, BLOCK_NORMS_7B),
        ("layernorm-simp", True, BLOCK_NORMS_7B + 4096),
        ("layernorm+projector", False, BLOCK_NORMS_7B + PROJECTOR_7B),
        ("layernorm", False, BLOCK_NORMS_7B + PROJECTOR_7B + EMBED_HEAD_7B),
    ],
)
def test_recipe_counts_7b(llava_7b_meta, tuning, final_norm, expected):
    model = llava_7b_meta
    assert BLOCK_NORMS_7B == 262_144 and PROJECTOR_7B == 20_979_712 and EMBED_HEAD_7B == 262_668_288
    report = mmfast.patch(model, tuning=tuning, final_norm=final_norm, verbose=False)
    trainable = _trainable(model)
    assert report.trainable_params == sum(p.numel() for p in trainable.values()) == expected
    assert all(p.is_meta for p in model.parameters())  # no data was touched
    lm = "model.language_model."
    expected_names = {f"{lm}layers.{i}.{k}.weight" for i in range(32) for k in ("input_layernorm", "post_attention_layernorm")}
    if final_norm:
        expected_names.add(f"{lm}norm.weight")
    if tuning != "layernorm-simp":
        expected_names |= {f"model.multi_modal_projector.linear_{i}.{k}" for i in (1, 2) for k in ("weight", "bias")}
    if tuning == "layernorm":
        expected_names |= {f"{lm}embed_tokens.weight", "lm_head.weight"}
    assert set(trainable) == expected_names
    for name, p in trainable.items():  # norms are fp32 master weights; the rest keeps its dtype
        assert p.dtype == torch.float32 if "layernorm" in name or name.endswith("norm.weight") else True
    assert not any("vision_tower" in n for n in trainable)


def _vlm_meta(family):
    """Tiny vision-language models whose projector has another name than LLaVA's (meta device)."""
    import transformers as T

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=128)
    if family == "idefics3":  # also SmolVLM: model.connector
        cfg = T.Idefics3Config(text_config=dict(model_type="llama", **text), scale_factor=2, vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8))
        cls, projector = T.Idefics3ForConditionalGeneration, ["model.connector"]
    elif family == "qwen2_vl":  # the vision tower's patch merger
        cfg = T.Qwen2VLConfig(text_config=dict(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, **text),
                              vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                                                 patch_size=4, spatial_merge_size=2, temporal_patch_size=1))
        cls, projector = T.Qwen2VLForConditionalGeneration, ["model.visual.merger"]
    else:  # qwen3_vl: the merger and the mergers of the features added to early LLM layers
        cfg = T.Qwen3VLConfig(
            text_config=dict(head_dim=8, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}, **text),
            vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=1, deepstack_visual_indexes=[0, 1]))
        cls, projector = T.Qwen3VLForConditionalGeneration, ["model.visual.merger", "model.visual.deepstack_merger_list"]
    with torch.device("meta"):
        return cls(cfg), projector


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("tuning", ["layernorm", "layernorm+projector", "mma"])
def test_recipes_find_other_projectors(family, tuning):
    """The projector of VLM families that do not call it multi_modal_projector trains with the recipes
    that train it (it was left frozen, and layernorm+projector refused these models)."""
    model, projector = _vlm_meta(family)
    mmfast.patch(model, tuning=tuning, verbose=False)
    trainable = _trainable(model)
    for path in projector:
        params = {f"{path}.{n}" for n, _ in model.get_submodule(path).named_parameters()}
        assert params and params <= set(trainable), path
    outside = {n for n in trainable if not any(n.startswith(p + ".") for p in projector)}
    if tuning == "layernorm+projector":
        assert outside and all(n.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) for n in outside)
    vision = [n for n in outside if n.startswith(("model.visual.blocks", "model.vision_model"))]
    assert all(".mma_adapter." in n for n in vision) and (tuning == "mma" or not vision)  # the tower stays frozen


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
@pytest.mark.parametrize("tuning", ["layernorm", "mma"])
def test_a_language_model_that_is_a_causal_lm(family, tuning):
    """BLIP-2's language model is a whole causal LM (its get_decoder() hands out LlamaForCausalLM): the
    recipes find the decoder one level down and the projector (language_projection); the LayerNorm recipes
    refused BLIP-2, and MMA went into its vision tower alone. A step trains what the recipe trains."""
    import transformers as T

    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=128)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                   encoder_hidden_size=32, vocab_size=128)
    cls, config = ((T.Blip2ForConditionalGeneration, T.Blip2Config) if family == "blip2"
                   else (T.InstructBlipForConditionalGeneration, T.InstructBlipConfig))
    torch.manual_seed(0)
    model = cls(config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4,
                       image_token_id=120))
    report = mmfast.patch(model, tuning=tuning, verbose=False)
    trainable = _trainable(model)
    assert {f"language_projection.{k}" for k in ("weight", "bias")} <= set(trainable)
    lm = "language_model.model.layers"
    if tuning == "mma":
        assert {f"{lm}.{i}.mma_adapter" for i in range(2)} <= set(report.adapters)
    else:
        assert {f"{lm}.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")} \
            <= set(trainable)
    ids = torch.randint(0, 100, (2, 10))
    ids[:, :4] = 120
    extra = {"qformer_input_ids": torch.randint(0, 100, (2, 5))} if family == "instructblip" else {}
    model(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32), labels=ids, **extra).loss.backward()
    assert all(p.grad is not None for p in trainable.values())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_mma_reports_a_vision_tower_without_adapters(family):
    """A vision tower whose layers are not CLIP/SigLIP-style gets no MMA adapters: the report says so (it
    said nothing), and the language model gets its adapters."""
    model, _ = _vlm_meta(family)
    report = mmfast.patch(model, tuning="mma", verbose=False)
    assert [p for p, why in report.skipped if "no MMA adapters" in why and "layer_norm1" in why] == ["model.visual"]
    assert report.adapters and not any(a.startswith("model.visual") for a in report.adapters)


def test_recipe_errors():
    with pytest.raises(ValueError, match="tuning="):
        mmfast.patch(build("llama"), tuning="lora", verbose=False)
    with pytest.raises(ValueError, match="LLaMA-style language model"):
        mmfast.patch(build("clip-vision"), tuning="layernorm-simp", verbose=False)
    with pytest.raises(ValueError, match="projector"):
        mmfast.patch(build("llama"), tuning="layernorm+projector", verbose=False)
    report = mmfast.patch(build("llama"), tuning="layernorm", verbose=False)  # no projector: norms + embeddings + head
    assert report.trainable_params == 2 * 2 * 40 + 2 * 64 * 40


# ---------------------------------------------------------------------------------------------
# training: fp32 master weights move, bf16 ones would not
# ---------------------------------------------------------------------------------------------


def _train_steps(model, steps=5, lr=1e-4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    inputs = batch("llava", seed=3, dtype=torch.bfloat16)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_bf16_layernorm_simp_trains_with_master_weights():
    model = build("llava", dtype=torch.bfloat16)
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    trainable = _trainable(model)
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    losses = _train_steps(model)
    for n, p in trainable.items():
        assert not torch.equal(p, before[n]), f"{n} did not move"
    assert losses[-1] < losses[0], losses


def test_a_cast_after_patching_that_drops_the_master_weights_warns(recwarn):
    """A cast of the patched model (Lightning's precision="bf16-true" casts the module) makes the fp32
    master weights bf16 again, and they stop learning: one warning says so when training runs (before,
    nothing did). Evaluation, a model whose masters stay fp32, or a distributed run (FSDP2's mixed precision
    and DeepSpeed's bf16 engines run 16-bit weights over fp32 masters of their own) say nothing; unpatch
    removes the check."""
    model = build("llava", dtype=torch.bfloat16)
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    _train_steps(model, steps=1)
    model.eval()
    model.to(torch.bfloat16)
    with torch.no_grad():
        model(**batch("llava", seed=3, dtype=torch.bfloat16))
    assert not [w for w in recwarn if "master_weights" in str(w.message)]
    model.train()
    with pytest.MonkeyPatch.context() as mp:  # distributed runs: FSDP2 / DeepSpeed keep fp32 masters of their own
        mp.setattr(torch.distributed, "is_initialized", lambda: True)
        _train_steps(model, steps=1)
    assert not [w for w in recwarn if "master_weights" in str(w.message)]
    _train_steps(model, steps=2)
    said = [str(w.message) for w in recwarn if "master_weights" in str(w.message)]
    assert len(said) == 1 and "bfloat16 now" in said[0] and "bf16-true" in said[0]
    mmfast.unpatch(model)
    _train_steps(model, steps=1)
    assert len([w for w in recwarn if "master_weights" in str(w.message)]) == 1


@pytest.mark.parametrize("tuning,words", [("layernorm-simp", "trainable norm weights"), ("mma", "MMA adapters")])
def test_the_cast_warning_is_once_per_model(tuning, words, recwarn):
    """The warning that a cast after patching took the fp32 trainables out of fp32 was once per process: a
    second model cast the same way (a sweep in one notebook) trained its 16-bit norms or adapters in
    silence. It is once per model now (the message names the model: Python's default filter shows a
    warning text once per place)."""

    def cast_and_train(model):
        model.to(torch.bfloat16)
        model.train()
        for _ in range(2):
            model(**batch("llava", seed=3, dtype=torch.bfloat16)).loss.backward()
        return len([w for w in recwarn if words in str(w.message)])

    first, second = build("llava"), build("llava", seed=1)
    for m in (first, second):
        mmfast.patch(m, tuning=tuning, verbose=False)
    assert cast_and_train(first) == 1
    assert cast_and_train(second) == 2
    assert cast_and_train(first) == 2


def test_the_cast_warning_is_only_for_norm_weights_that_train():
    """The cast warning (master_weights' fp32 norm weights made 16-bit since the patch) is for weights a
    training forward trains: not in eval (a forward with grad, for saliency, say), nor for weights frozen
    since the patch; the first training forward of the trainable ones says it."""
    words = "trainable norm weights"
    model = build("llava")
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    model.to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.eval()
        model(**batch("llava", seed=3, dtype=torch.bfloat16))
        model.train()
        model.requires_grad_(False)
        model(**batch("llava", seed=3, dtype=torch.bfloat16))
        assert not [w for w in seen if words in str(w.message)]
        mmfast.patch(model, tuning="layernorm-simp", verbose=False)
        model.to(torch.bfloat16)
        model(**batch("llava", seed=3, dtype=torch.bfloat16))
    assert len([w for w in seen if words in str(w.message)]) == 1


@pytest.mark.parametrize("tuning,words", [("layernorm-simp", "trainable norm weights"), ("mma", "MMA adapters")])
def test_the_cast_warning_is_said_again_after_a_patch_again(tuning, words):
    """The README's way out of a cast after patching is to patch again (fp32 again); a second cast since was
    not said: the record of the first warning stayed on the model, and its text was the first one's, which
    Python's default filter shows once. A patch again re-arms it, under another text."""
    model = build("llava")

    def cast_and_train(dtype):
        model.to(dtype)
        model.train()
        for _ in range(2):
            model(**batch("llava", seed=3, dtype=dtype)).loss.backward()

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # (what a user's process shows: once per text and place)
        mmfast.patch(model, tuning=tuning, verbose=False)
        cast_and_train(torch.bfloat16)
        mmfast.patch(model, tuning=tuning, verbose=False)  # (fp32 again: the tests above)
        cast_and_train(torch.float16)
        cast_and_train(torch.bfloat16)
    said = [str(w.message) for w in seen if words in str(w.message)]
    assert len(said) == 2 and "bfloat16 now" in said[0] and "float16 now" in said[1], said
    assert said[0] != said[1] and all("LlavaForConditionalGeneration at 0x" in w for w in said)


def _step(model, opt, dtype=torch.float32):
    model.train()
    model(**batch("llava", seed=3, dtype=dtype)).loss.backward()
    opt.step()
    opt.zero_grad()


def _optimizer_said(seen) -> list[str]:
    return [str(w.message) for w in seen if "Build the optimizer after mmfast.patch" in str(w.message)]


def test_an_optimizer_built_before_mma_is_told_it_misses_the_adapters(recwarn):
    """``AdamW(model.parameters())`` built before ``mmfast.patch(tuning="mma")`` holds none of the adapters
    the patch adds: they got gradients and never changed (the method trained nothing of its own), without a
    word. Its first step after the patch says so, once; an optimizer built after the patch says nothing."""
    model = build("llava")
    early = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mmfast.patch(model, tuning="mma", verbose=False)
    for _ in range(2):
        _step(model, early)
    said = _optimizer_said(recwarn)
    assert len(said) == 1 and "AdamW holds the parameters of LlavaForConditionalGeneration" in said[0], said
    assert "mma_embedding" in said[0] or "adapter" in said[0]
    for params in (model.parameters(), [p for p in model.parameters() if p.requires_grad]):
        _step(model, torch.optim.AdamW(params, lr=1e-3))
    # built after the patch, split by module over .parameters() (frozen ones included): nothing to say
    tower = list(model.model.vision_tower.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in tower)]
    opts = [torch.optim.AdamW(tower, lr=1e-3), torch.optim.AdamW(rest, lr=1e-3)]
    model(**batch("llava", seed=3)).loss.backward()
    for opt in opts:
        opt.step()
    assert len(_optimizer_said(recwarn)) == 1


def test_an_optimizer_that_stepped_before_the_master_weights_is_told_why_it_fails(recwarn):
    """A bf16 model's optimizer that stepped before ``mmfast.patch``: the patch widens the trained norm
    weights to fp32 in place, and AdamW's next step failed on its bf16 state with "expected dtype
    c10::BFloat16 for `end` but got dtype float", naming nothing of mmfast. A warning names the cause first;
    the same order for a LayerNorm recipe on an fp32 model, or an optimizer that had not stepped, trains."""
    model = build("llava", dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt, torch.bfloat16)
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    with pytest.raises(RuntimeError):  # (PyTorch's own error follows the warning)
        _step(model, opt, torch.bfloat16)
    said = _optimizer_said(recwarn)
    assert len(said) == 1 and "while they were bfloat16" in said[0] and "input_layernorm" in said[0], said
    recwarn.clear()
    # patched twice (the README's patch again), or with another recipe first: the second patch widens
    # nothing, and its record took the place of the first's, so the step failed without the warning
    for recipes in (("layernorm-simp", "layernorm-simp"), ("layernorm-simp", "layernorm")):
        model = build("llava", dtype=torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        _step(model, opt, torch.bfloat16)
        for tuning in recipes:
            mmfast.patch(model, tuning=tuning, verbose=False)
        with pytest.raises(RuntimeError):
            _step(model, opt, torch.bfloat16)
        said = _optimizer_said(recwarn)
        assert len(said) == 1 and "while they were bfloat16" in said[0], (recipes, said)
        recwarn.clear()
    for dtype, stepped in ((torch.bfloat16, False), (torch.float32, True)):
        model = build("llava", dtype=dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if stepped:
            _step(model, opt, dtype)
        mmfast.patch(model, tuning="layernorm-simp", verbose=False)
        _step(model, opt, dtype)
    assert not _optimizer_said(recwarn)

    for tuning in ("layernorm-simp", "mma"):  # a cast after the patch, a step, then a patch again (its advice)
        model = build("llava")
        mmfast.patch(model, tuning=tuning, verbose=False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.to(torch.bfloat16)
        _step(model, opt, torch.bfloat16)
        mmfast.patch(model, tuning=tuning, verbose=False)
        recwarn.clear()
        with pytest.raises(RuntimeError):
            _step(model, opt, torch.bfloat16)
        said = _optimizer_said(recwarn)
        assert len(said) == 1 and "while they were bfloat16" in said[0], (tuning, said)
        recwarn.clear()

    class Bf16Momentum(torch.optim.SGD):
        """16-bit state for fp32 weights by design (AnyPrecisionAdamW-style)."""

        @torch.no_grad()
        def step(self, closure=None):
            for p in (p for g in self.param_groups for p in g["params"] if p.grad is not None):
                buf = self.state[p].setdefault("buf", torch.zeros_like(p, dtype=torch.bfloat16))
                p.sub_(buf.mul_(0.9).add_(p.grad.bfloat16()).float(), alpha=1e-3)

    model = build("llava", dtype=torch.bfloat16)
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    opt = Bf16Momentum([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _step(model, opt, torch.bfloat16)
    mmfast.patch(build("llava"), tuning="layernorm-simp", verbose=False)  # (another model: looked again)
    _step(model, opt, torch.bfloat16)
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)  # (the same model: its state came after)
    _step(model, opt, torch.bfloat16)
    assert len(_optimizer_said(recwarn)) == 0


@pytest.mark.parametrize("tuning,words", [("layernorm-simp", "trainable norm weights"), ("mma", "MMA adapters")])
def test_a_cast_to_float64_is_not_warned_about(tuning, words, recwarn):
    """A patched model cast to float64 (a reference run in double, under mmfast.disabled()) was warned that
    "small updates round away in that dtype": float64 holds every fp32 update."""
    model = build("llava")
    mmfast.patch(model, tuning=tuning, verbose=False)
    model.double().train()
    with mmfast.disabled():
        model(**batch("llava", seed=3, dtype=torch.float64)).loss.backward()
    assert not [w for w in recwarn if words in str(w.message)]


def test_a_float64_model_keeps_its_trainables_in_float64():
    """Patching a float64 model (a reference run in double, under mmfast.disabled()) with a LayerNorm recipe
    narrowed its trainable norm weights to fp32 (master_weights), rounding them and every update after; a
    patch again after ``.double()`` did the same to MMA's adapters. Only 16-bit weights are widened."""
    model = build("llava", dtype=torch.float64)
    before = {n: p.clone() for n, p in model.named_parameters() if "layernorm" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in before:
                p.add_(1e-9 * torch.randn_like(p))  # values fp32 cannot hold
                before[n] = p.clone()
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and set(trained) <= set(before)
    for n, p in trained.items():
        assert p.dtype == torch.float64 and torch.equal(p, before[n]), n
    with mmfast.disabled():
        model(**batch("llava", seed=3, dtype=torch.float64)).loss.backward()
    assert all(p.grad.dtype == torch.float64 for p in trained.values())

    model.float()  # (the reference run done: fp32 from here, its norms' forwards as they are, disabled or not)
    inputs = batch("llava", seed=3)
    with torch.no_grad():
        assert model(**inputs).logits.dtype == torch.float32
        with mmfast.disabled():
            assert model(**inputs).logits.dtype == torch.float32

    model = build("llava")
    mmfast.patch(model, tuning="mma", verbose=False)
    model.double()
    mmfast.patch(model, tuning="mma", verbose=False)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float64 for p in trained)


def test_a_bf16_model_cast_to_fp32_and_patched_again_computes_as_an_fp32_model():
    """A bf16 model patched (its norm weights widened to fp32 masters), cast with ``.float()`` and patched again
    kept the bf16 recorded at the first patch as the dtype its norms had, so fed bf16 embeddings they returned
    bf16 into the fp32 projections, which failed (patched and under mmfast.disabled()); an fp32 model promotes
    them to fp32."""
    model = build("llama", dtype=torch.bfloat16)
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    model.float()
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    plain = copy.deepcopy(model)
    mmfast.unpatch(plain)
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    emb = plain.get_input_embeddings()(batch("llama")["input_ids"]).to(torch.bfloat16)
    with torch.no_grad():
        expected = plain(inputs_embeds=emb).logits
        assert expected.dtype == torch.float32
        torch.testing.assert_close(model(inputs_embeds=emb).logits, expected)
        with mmfast.disabled():
            torch.testing.assert_close(model(inputs_embeds=emb).logits, expected)


def test_a_model_built_in_fp32_then_cast_after_patching_warns_too(recwarn):
    """The norm weights of a model built in fp32 are fp32 at patch time, so nothing was widened; a cast to
    bf16 after patching (Lightning's "bf16-true") takes them out of fp32 all the same, and said nothing."""
    model = build("llava")
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    _train_steps(model, steps=1)
    assert not [w for w in recwarn if "master_weights" in str(w.message)]
    model.to(torch.bfloat16)
    model.train()
    model(**batch("llava", seed=3, dtype=torch.bfloat16)).loss.backward()
    said = [str(w.message) for w in recwarn if "master_weights" in str(w.message)]
    assert len(said) == 1 and "bfloat16 now" in said[0]
    mmfast.unpatch(model)  # the cast's dtype stays
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("tuning", ["layernorm-simp", "layernorm", "mma"])
def test_a_recipe_on_a_peft_model_keeps_its_adapters_training(tuning):
    """A recipe freezes the model around its own parameters; PEFT's LoRA weights, which the user added,
    were frozen with the rest without a word. A norm in PEFT's ``modules_to_save`` trains through its active
    copy (the one that runs, fp32 master weights included), not the ``original_module`` PEFT keeps aside."""
    from peft import LoraConfig, get_peft_model

    kind = "llava" if tuning == "mma" else "llama"
    base = build(kind, dtype=torch.bfloat16 if tuning != "mma" else torch.float32)
    config = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)" if kind == "llava"
                        else ["q_proj", "v_proj"], lora_dropout=0.0, modules_to_save=["input_layernorm"])
    model = get_peft_model(base, config)
    lora = {n for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    assert lora
    mmfast.patch(model, tuning=tuning, verbose=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora <= trained
    assert not any("original_module" in n for n in trained)
    copies = [n for n in trained if "input_layernorm.modules_to_save" in n]
    assert copies
    if tuning != "mma":  # the recipe's norms: the active copy is the one widened to fp32
        assert all(model.get_parameter(n).dtype == torch.float32 for n in copies)
    model.train()
    out = model(**batch(kind, dtype=torch.bfloat16 if tuning != "mma" else torch.float32))
    out.loss.backward()
    assert [n for n in trained if model.get_parameter(n).grad is None] == []


def test_a_recipe_on_peft_ln_tuning_trains_the_copies_that_run_in_fp32():
    """PEFT's LNTuningConfig wraps each norm in an LNTuningLayer that runs a copy (``ln_tuning_layers``) beside
    its ``base_layer``. A recipe made the wrapper's every parameter trainable: the unused ``base_layer`` too
    (no gradient, counted twice, an unused parameter for DDP), and widened neither to fp32, since the wrapper
    holds no weight of its own: in bf16 an AdamW step of 1e-4 moved no element of the norms that run."""
    from peft import LNTuningConfig, get_peft_model

    config = LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm"], task_type="CAUSAL_LM")
    model = get_peft_model(build("llama", dtype=torch.bfloat16), config)
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    trained = _trainable(model)
    assert trained and all(".ln_tuning_layers.default." in n for n in trained), sorted(trained)
    assert all(p.dtype == torch.float32 for p in trained.values())
    before = {n: p.detach().clone() for n, p in trained.items()}
    opt = torch.optim.AdamW(list(trained.values()), lr=1e-4, weight_decay=0.0)
    model.train()
    model(**batch("llama", dtype=torch.bfloat16)).loss.backward()
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in trained.items())


def _recipe_frozen_warnings(model, kind: str) -> list[str]:
    """The "recipe froze" warnings of one training step (forward and backward in training mode)."""
    import warnings

    model.train()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(**batch(kind)).loss.backward()
    return [str(w.message) for w in seen if "froze them after mmfast.patch" in str(w.message)]


def test_the_recipe_frozen_warning_is_said_for_each_model_and_patch():
    """"Something froze the recipe's parameters" was once per process for an address (a key with the
    model's ``id``) and once per text (Python's default filter): a new model at a freed one's address (a
    sweep in one process, one model after another) and a model patched again were not told."""
    import gc

    def frozen_step(model):
        model.requires_grad_(False)
        model.train()
        model(**batch("llama"))

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # (what a user's process shows: once per text and place)
        for seed in range(4):
            model = build("llama", seed=seed)
            mmfast.patch(model, tuning="layernorm-simp", verbose=False)
            frozen_step(model)
            if seed == 0:  # a patch again makes them trainable again; frozen again, said again
                mmfast.patch(model, tuning="layernorm-simp", verbose=False)
                frozen_step(model)
            del model
            gc.collect()
    said = [str(w.message) for w in seen if "froze them after mmfast.patch" in str(w.message)]
    assert len(said) == 5 and len(set(said)) == 5, said


def test_freezing_some_of_the_recipes_parameters_is_not_called_freezing_them_all():
    """A user who freezes part of what the recipe trains (the first layer's norm, say) still trains the rest:
    "something froze the recipe's parameters" is said only when none of them trains any more."""
    model = build("llama")
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    model.model.layers[0].input_layernorm.weight.requires_grad_(False)
    model.train()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(**batch("llama"))
        assert not [w for w in seen if "froze them after mmfast.patch" in str(w.message)]
        model.requires_grad_(False)
        model(**batch("llama"))
    said = [str(w.message) for w in seen if "froze them after mmfast.patch" in str(w.message)]
    assert len(said) == 1, said


@pytest.mark.parametrize("tuning", ["layernorm-simp", "mma"])
def test_peft_wrapping_a_patched_model_warns_that_the_recipe_froze(tuning, monkeypatch):
    """patch, then get_peft_model (TRL's SFTTrainer(peft_config=...) does it): PEFT froze every recipe
    parameter and LoRA trained alone, without a word. A training forward says so now; the other order
    (PEFT, then patch) trains both and says nothing."""
    import warnings

    from peft import LoraConfig, get_peft_model

    kind = "llava" if tuning == "mma" else "llama"
    config = LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj" if kind == "llava" else ["q_proj"])
    for order in ("peft first", "patch first"):
        monkeypatch.setattr("mmfast.ops.backend._warned", set())
        if order == "peft first":
            model = get_peft_model(build(kind), config)
            mmfast.patch(model, tuning=tuning, verbose=False)
        else:
            model = build(kind)
            mmfast.patch(model, tuning=tuning, verbose=False)
            model = get_peft_model(model, config)
        assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
        model.train()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model(**batch(kind)).loss.backward()
            model.eval()
            with torch.no_grad():
                model(**batch(kind))
        said = [str(w.message) for w in seen if "froze them after mmfast.patch" in str(w.message)]
        assert len(said) == (order == "patch first"), (order, said)


def test_the_recipe_watch_follows_replaced_parameters_and_keeps_none_alive(monkeypatch):
    """The watch looks its parameters up by name: after ``load_state_dict(assign=True)`` (FSDP2 replaces
    them too) it kept the old objects alive (a whole embedding and LM head under tuning="layernorm")
    and watched those instead of the model's."""
    import gc
    import weakref

    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    old = weakref.ref(model.get_input_embeddings().weight)
    model.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}, assign=True)
    gc.collect()
    assert old() is None
    monkeypatch.setattr("mmfast.ops.backend._warned", set())
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    assert _recipe_frozen_warnings(model, "llama")


def test_a_second_recipe_keeps_the_embedding_hook_reentrant_checkpointing_needs():
    """tuning="layernorm" (embeddings trained: no hook), then "layernorm-simp": the frozen embeddings'
    output must require grad for reentrant checkpoint wrappers (FSDP's, DeepSpeed's), and the second
    patch took the first one's recipe watch for that hook and skipped it: the block norms got no
    gradient."""
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=partial(checkpoint_wrapper,
                                                                        checkpoint_impl=CheckpointImpl.REENTRANT),
                                   check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    model.train()
    model(**batch("llama")).loss.backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and [n for n in trained if model.get_parameter(n).grad is None] == []


@pytest.mark.parametrize("saved", [["input_layernorm"], ["embed_tokens"]])
def test_the_recipe_watch_warns_when_peft_also_wraps_what_it_trained(saved, monkeypatch):
    """PEFT wrapping a module the recipe trains (modules_to_save) moves its parameter: the watch took that
    for "gone, nothing to say" and stayed silent while PEFT froze everything else the recipe trained."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr("mmfast.ops.backend._warned", set())
    model = build("llama")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=saved))
    assert _recipe_frozen_warnings(model, "llama")


def test_a_recipe_trains_the_norm_peft_runs():
    """Where PEFT's forward runs a wrapper's ``original_module`` (the active adapter has no copy of this norm),
    that is the norm the recipe trains (the whole wrapper trained, the unused copy never got a gradient); a
    prompt-learning model's prompt encoder keeps training (it was frozen)."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    model = get_peft_model(build("llama", dtype=torch.bfloat16),
                           LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["input_layernorm"]),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(r=4, target_modules=["v_proj"]))
    model.set_adapter("b")
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = [n for n in trained if "input_layernorm" in n]
    assert norms and all("original_module" in n for n in norms)
    assert all(model.get_parameter(n).dtype == torch.float32 for n in norms)
    model.train()
    model(**batch("llama", dtype=torch.bfloat16)).loss.backward()
    assert [n for n in trained if model.get_parameter(n).grad is None] == []

    prompt = get_peft_model(build("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    mmfast.patch(prompt, tuning="layernorm-simp", verbose=False)
    assert any("prompt_encoder" in n for n, p in prompt.named_parameters() if p.requires_grad)


def test_bf16_norm_weights_would_not_move():
    """Without master weights, AdamW's 1e-4 updates to bf16 weights near 1.0 round away entirely."""
    model = build("llava", dtype=torch.bfloat16)
    mmfast.patch(model, tuning="layernorm-simp", master_weights=False, verbose=False)
    trainable = _trainable(model)
    assert all(p.dtype == torch.bfloat16 for p in trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    _train_steps(model)
    for n, p in trainable.items():
        assert torch.equal(p, before[n]), f"{n} moved"


# ---------------------------------------------------------------------------------------------
# HF Trainer, gradient checkpointing
# ---------------------------------------------------------------------------------------------


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n=8):
        b = batch("llava", seed=5, B=n)
        self.items = [{k: v[i] for k, v in b.items()} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _checkpointing_args(on: bool, reentrant: bool) -> dict:
    """TrainingArguments for activation checkpointing, under the name this transformers uses."""
    from transformers import TrainingArguments

    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": reentrant}}


@pytest.mark.parametrize("checkpointing", ["off", "reentrant", "non-reentrant", "compiled"])
def test_hf_trainer(checkpointing, tmp_path, monkeypatch):
    """HF Trainer steps a patched model (with activation checkpointing, or ``torch_compile=True``); the
    fused LM-head loss runs in every step, compiled or not."""
    from transformers import Trainer, TrainingArguments

    from mmfast.ops import loss as loss_ops

    fused_calls, eager_calls = [], []
    real, real_eager = loss_ops._loss_and_grads, loss_ops._LinearCrossEntropyFn.forward
    monkeypatch.setattr(loss_ops, "_loss_and_grads", lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    monkeypatch.setattr(loss_ops._LinearCrossEntropyFn, "forward",
                        staticmethod(lambda *a: eager_calls.append(1) or real_eager(*a)))
    torch._dynamo.reset()
    model = build("llava")
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    trainable = _trainable(model)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    compiled = dict(torch_compile=True, torch_compile_backend="aot_eager") if checkpointing == "compiled" else {}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        **_checkpointing_args(checkpointing in ("reentrant", "non-reentrant"), checkpointing == "reentrant"),
        **compiled,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Dataset())
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    # every step ran the fused loss: compiled, through the custom op (the eager path's Function never ran)
    assert len(fused_calls) == 3 and len(eager_calls) == (0 if checkpointing == "compiled" else 3)
    layers = model.model.language_model.layers
    assert bool(getattr(layers[0], "gradient_checkpointing", False)) == (checkpointing in ("reentrant",
                                                                                           "non-reentrant"))
    for n, p in trainable.items():
        assert not torch.equal(p, before[n]), f"{n} did not move"


@pytest.mark.parametrize("option", ["label-smoothing", "accumulation"])
def test_hf_trainer_options_train_the_unpatched_objective(option, tmp_path, monkeypatch):
    """Trainer options that change the loss: label smoothing (Trainer takes the labels out of the forward
    and smooths the logits itself: the fused loss must not arm, the model must return logits) and gradient
    accumulation over micro-batches with different numbers of labelled tokens (Trainer passes
    ``num_items_in_batch``: the fused loss must sum over the micro-batch and divide by the whole batch's
    count). The patched model logs the unpatched one's losses and takes its steps (plain SGD: a parameter
    differs by what its gradient's rounding does, fp32 here)."""
    from transformers import Trainer, TrainingArguments

    from mmfast.ops import loss as loss_ops

    fused_calls = []
    real = loss_ops._loss_and_grads
    monkeypatch.setattr(loss_ops, "_loss_and_grads", lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    data = _Dataset()
    for i, item in enumerate(data.items):  # 1 to 5 more unlabelled tokens than the image's
        item["labels"] = item["labels"].clone()
        item["labels"][IMAGE_TOKENS + 1:IMAGE_TOKENS + 2 + i % 5] = -100
    option_args = dict(label_smoothing_factor=0.1) if option == "label-smoothing" else \
        dict(gradient_accumulation_steps=2)

    def run(patched: bool):
        model = build("llava", seed=3)
        ref = copy.deepcopy(model)
        mmfast.patch(ref, tuning="layernorm-simp", verbose=False)
        names = set(_trainable(ref))
        if patched:
            model = ref
        else:
            for n, p in model.named_parameters():
                p.requires_grad_(n in names)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(patched)), max_steps=2, per_device_train_batch_size=2, learning_rate=0.5,
            optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
            logging_steps=1, disable_tqdm=True, seed=0, data_seed=0, **option_args)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], _trainable(model)

    plain_losses, plain = run(False)
    assert not fused_calls
    losses, tuned = run(True)
    assert len(fused_calls) == (0 if option == "label-smoothing" else 4)
    assert len(losses) == 2 and losses == pytest.approx(plain_losses, rel=1e-5)
    assert tuned.keys() == plain.keys()
    start = dict(build("llava", seed=3).named_parameters())
    for n, p in tuned.items():
        assert not torch.equal(p, start[n]), f"{n} did not move"
        torch.testing.assert_close(p, plain[n], rtol=0, atol=1e-5, msg=n)


def test_peft_trainer_resume_with_the_callback(tmp_path):
    """A PEFT model's Trainer checkpoints hold PEFT's adapters only: resumed, the recipe's parameters started
    again from the base model. mmfast.SaveTrainable saves them beside each checkpoint, and loading them
    before the resume gives the uninterrupted run's parameters."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    SaveTrainable = mmfast.SaveTrainable

    def run(out, steps, resume=None):
        torch.manual_seed(0)
        model = get_peft_model(build("llava"), LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj"))
        mmfast.patch(model, tuning="layernorm-simp", verbose=False)
        args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="steps",
                                 save_steps=2, disable_tqdm=True, data_seed=0, seed=0, lr_scheduler_type="constant")
        trainer = Trainer(model=model, args=args, train_dataset=_Dataset(), callbacks=[SaveTrainable()])
        if resume:
            mmfast.load_trainable(model, f"{resume}/mmfast.safetensors")
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "cut", 2)
    resumed = run(tmp_path / "resumed", 4, resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert any("layernorm" in n for n in whole) and any("lora_" in n for n in whole)
    for n in whole:
        torch.testing.assert_close(resumed[n], whole[n], rtol=1e-5, atol=1e-6, msg=n)


def test_a_bf16_model_patched_again_under_peft_modules_to_save_keeps_bf16_outputs():
    """The README's order with a norm in PEFT's modules_to_save: patch, get_peft_model, patch again. PEFT copies
    the patched norm (an fp32 master weight) into original_module and the active copy; the patch again took the
    fp32 original_module beside the active copy for the model's dtype, recorded the norm as fp32-built, and its
    outputs went fp32 into the bf16 projections (a training step and mmfast.disabled() failed)."""
    from peft import LoraConfig, get_peft_model

    base = build("llama", dtype=torch.bfloat16)
    mmfast.patch(base, tuning="layernorm-simp", verbose=False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["input_layernorm"]))
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    norm = model.base_model.model.model.layers[0].input_layernorm
    assert norm.modules_to_save["default"].weight.dtype == torch.float32
    model.train()
    model(**batch("llama")).loss.backward()  # (the fused loss: no logits in a training step)
    assert norm.modules_to_save["default"].weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert model(input_ids=batch("llama")["input_ids"]).logits.dtype == torch.bfloat16
        with mmfast.disabled():
            assert model(**batch("llama")).logits.dtype == torch.bfloat16


def test_peft_modules_to_save_norms_reload_exactly_into_a_patched_base(tmp_path):
    """The README's way to reload norms trained in PEFT's ``modules_to_save`` of a bf16 model (saved in fp32
    by PeftModel.save_pretrained): patch the base, PeftModel.from_pretrained, patch again. Loaded into an
    unpatched bf16 base instead, they are rounded to bf16 on the way in."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["input_layernorm", "post_attention_layernorm"])
    model = get_peft_model(build("llama", dtype=torch.bfloat16), config)
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    for _ in range(4):
        model(**batch("llama", dtype=torch.bfloat16)).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "modules_to_save" in n}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    model.save_pretrained(tmp_path)
    for patch_base_first in (True, False):
        base = build("llama", dtype=torch.bfloat16)
        if patch_base_first:
            mmfast.patch(base, tuning="layernorm-simp", verbose=False)
        again = PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
        mmfast.patch(again, tuning="layernorm-simp", verbose=False)
        got = dict(again.named_parameters())
        assert all(torch.equal(got[n], p) for n, p in trained.items()) == patch_base_first


def test_load_best_model_at_end_with_the_callback(tmp_path):
    """``load_best_model_at_end``: Trainer loads the best checkpoint's weights, which for a PEFT model are
    PEFT's adapters alone, so the model ended with the best step's LoRA beside the last step's norms.
    mmfast.SaveTrainable loads the best checkpoint's own file after Trainer's load: every trainable is the
    best step's."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(build("llava"), LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj"))
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    # the best step by this metric is the first (the loss falls): not the last, whose values the model holds
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="steps", save_steps=1,
                             eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                             metric_for_best_model="eval_loss", greater_is_better=True, disable_tqdm=True,
                             seed=0, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=_Dataset(), eval_dataset=_Dataset(4),
                      callbacks=[mmfast.SaveTrainable()])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-1")
    saved = load_file(f"{best}/mmfast.safetensors")
    last = load_file(f"{tmp_path}/checkpoint-3/mmfast.safetensors")
    params = dict(model.named_parameters())
    names = [n for n in saved if "layernorm" in n]
    assert names and any("lora_" in n for n in saved)
    assert all(not torch.equal(saved[n], last[n]) for n in names)
    for n, value in saved.items():
        torch.testing.assert_close(params[n].detach(), value.to(params[n].dtype), rtol=0, atol=0, msg=n)


def test_the_callback_loads_the_best_file_only_when_trainer_loads_the_best_checkpoint(tmp_path):
    """Trainer sets ``best_model_checkpoint`` whenever ``metric_for_best_model`` is set, and loads it only with
    ``load_best_model_at_end``: without it the model keeps the last step's weights, and so must the recipe's
    (loading the best file there rolled the norms back beside the last step's other weights). A best
    checkpoint without the file keeps the last values and says so."""
    import types

    model = build("llama")
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    norm = model.model.layers[0].input_layernorm.weight
    best = tmp_path / "checkpoint-1"
    best.mkdir()
    mmfast.save_trainable(model, str(best / "mmfast.safetensors"))
    saved = norm.detach().clone()
    with torch.no_grad():
        norm.add_(torch.rand_like(norm) + 0.5)  # the steps since the best one
    last = norm.detach().clone()
    cb, state = mmfast.SaveTrainable(), types.SimpleNamespace(best_model_checkpoint=str(best), global_step=3)
    end = lambda load_best: cb.on_train_end(  # noqa: E731
        types.SimpleNamespace(load_best_model_at_end=load_best, output_dir=str(tmp_path)), state, None, model=model)
    end(False)
    assert torch.equal(norm.detach(), last)
    end(True)
    assert torch.equal(norm.detach(), saved)
    state.best_model_checkpoint = str(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2").mkdir()
    with torch.no_grad():
        norm.copy_(last)
    with pytest.warns(RuntimeWarning, match="has no mmfast.safetensors"):
        end(True)
    assert torch.equal(norm.detach(), last)


def test_trl_sft_trainer(tmp_path, monkeypatch):
    """TRL's SFTTrainer trains a patched LLaMA. TRL (1.x) adds its own fused LM head around the model's
    forward and asks for it in training, so its loss, entropy and token accuracy come from there; the
    fused norms run underneath, and mmfast's fused loss stays out of its way. trl is a dev extra (CI has
    it); a machine without it (the GPU machine has no package registry) skips this."""
    pytest.importorskip("trl", reason="trl is not installed (pip install -e .[dev] installs it)")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from mmfast.ops import norm as norm_ops
    from tiny_models import VOCAB

    norm_calls = []
    real = norm_ops._RMSNormFn.forward
    monkeypatch.setattr(norm_ops._RMSNormFn, "forward", staticmethod(lambda *a: norm_calls.append(1) or real(*a)))
    model = build("llama")
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    trainable = _trainable(model)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1")
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_list([{"input_ids": torch.randint(3, VOCAB, (12,), generator=g).tolist()} for _ in range(8)])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                     report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    logged = trainer.state.log_history[0]
    assert all(torch.isfinite(torch.tensor(logged[k])) for k in ("loss", "entropy", "mean_token_accuracy"))
    assert norm_calls, "the fused norms did not run"
    for n, p in trainable.items():
        assert not torch.equal(p, before[n]), f"{n} did not move"


def _hand_loop(model, steps):
    """Two SGD steps written out by hand: what a trainer integration must reproduce exactly."""
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        model(**batch("llava", seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    after = _trainable(model)
    assert all(not torch.equal(after[n], before[n]) for n in after)
    return after


def test_accelerate_steps_match_a_hand_loop():
    """Accelerate's prepare / backward / step over a patched LLaVA (``layernorm``: the fused loss trains
    the LM head) gives the trainable parameters of the same steps written by hand, bit for bit."""
    from accelerate import Accelerator

    model = build("llava")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    expected = _hand_loop(copy.deepcopy(model), 2)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    assert not accelerator.native_amp
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    prepared, opt = accelerator.prepare(model, opt)
    for step in range(2):
        accelerator.backward(prepared(**batch("llava", seed=step)).loss)
        opt.step()
        opt.zero_grad()
    got = _trainable(accelerator.unwrap_model(prepared))
    assert got.keys() == expected.keys()
    for n in got:
        assert torch.equal(got[n], expected[n]), n


def test_lightning_steps_match_a_hand_loop():
    """Lightning's Trainer over a LightningModule that patches its model in ``__init__`` (the README's
    recipe) gives the trainable parameters of the same steps written by hand, bit for bit. lightning is a
    dev extra; the GPU machine, which has no package registry, skips this."""
    L = pytest.importorskip("lightning", reason="lightning is not installed (pip install -e .[dev] installs it)")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build("llava")
            mmfast.patch(self.model, tuning="layernorm", verbose=False)

        def training_step(self, inputs, index):
            return self.model(**inputs).loss

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    module = Module()
    expected = _hand_loop(copy.deepcopy(module.model), 2)
    loader = torch.utils.data.DataLoader([batch("llava", seed=s) for s in range(2)], batch_size=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    assert trainer.global_step == 2
    got = _trainable(module.model)
    assert got.keys() == expected.keys()
    for n in got:
        assert torch.equal(got[n], expected[n]), n


@pytest.mark.parametrize("tuning", ["layernorm-simp", "layernorm+projector"])
def test_reentrant_checkpoint_wrapper_needs_the_input_grad_hook(tuning):
    """Reentrant activation checkpointing applied from outside HF (FSDP's checkpoint_wrapper): with
    frozen embeddings no block input requires grad, and without mmfast's hook the checkpointed blocks'
    norms get no gradient at all. With the projector trained too, a batch without images (text samples
    of a mixed dataset) has no trained module ahead of the blocks either."""
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = build("llava")
    mmfast.patch(model, tuning=tuning, verbose=False)
    inputs = batch("llava")
    if tuning != "layernorm-simp":  # text alone: the image tokens' ids stand as ordinary tokens
        inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
        inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, 1)
    apply_activation_checkpointing(
        model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer),
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT))
    model.train()
    norm = model.model.language_model.layers[0]._checkpoint_wrapped_module.input_layernorm
    model(**inputs).loss.backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    remove_tuning_hooks(model)
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        loss = model(**inputs).loss
    if loss.requires_grad:
        loss.backward()
    assert norm.weight.grad is None


def test_unpatch_removes_hooks():
    model = build("llava")
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    emb = model.get_input_embeddings()
    assert emb._forward_hooks
    mmfast.unpatch(model)
    assert not emb._forward_hooks


def test_patch_again_without_master_weights_rounds_them_back():
    """Patching again with master_weights=False left the fp32 master weights of an earlier patch (and their
    hooks): the bf16 norms asked for stayed fp32. They go back as unpatch rounds them; patching again with
    master weights widens them again."""
    model = build("llava", dtype=torch.bfloat16)
    pristine = {n: p.dtype for n, p in model.named_parameters()}
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    norm = model.model.language_model.layers[0].input_layernorm
    assert norm.weight.dtype == torch.float32
    with torch.no_grad():
        norm.weight.add_(1e-3)
    trained = norm.weight.detach().clone()
    mmfast.patch(model, tuning="layernorm-simp", master_weights=False, verbose=False)
    assert {n: p.dtype for n, p in model.named_parameters()} == pristine
    assert torch.equal(norm.weight, trained.bfloat16()) and norm.weight.requires_grad
    assert not norm._forward_pre_hooks and not norm._forward_hooks
    model(**batch("llava", dtype=torch.bfloat16)).loss.backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.bfloat16
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    assert norm.weight.dtype == torch.float32


@pytest.mark.parametrize("tuning", [None, "mma"])
def test_final_norm_without_a_layernorm_recipe_is_refused(tuning):
    """final_norm=True did nothing without a LayerNorm recipe (the final norm stayed frozen, without a word),
    where mma options without tuning='mma' raise."""
    model = build("llava")
    before = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="final_norm=True adds the final norm to a LayerNorm recipe"):
        mmfast.patch(model, tuning=tuning, final_norm=True, verbose=False)
    assert {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()} == before
    assert not mmfast.patching.core.is_patched(model.model.language_model.norm)


@pytest.mark.parametrize("tuning", ["layernorm-simp", "layernorm"])
def test_unpatch_gives_back_a_bf16_model_that_runs(tuning):
    """Master weights go back to bf16 (rounded), so the restored HF forwards see the dtypes they were
    written for: an fp32 RMSNorm weight would send fp32 into the bf16 projections."""
    model = build("llava", dtype=torch.bfloat16)
    pristine = {n: p.dtype for n, p in model.named_parameters()}
    mmfast.patch(model, tuning=tuning, final_norm=True, verbose=False)
    assert any(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        model.model.language_model.norm.weight.add_(1e-3)  # a trained value, rounded on the way back
    trained = model.model.language_model.norm.weight.detach().clone()
    mmfast.unpatch(model)
    assert {n: p.dtype for n, p in model.named_parameters()} == pristine
    assert torch.equal(model.model.language_model.norm.weight, trained.bfloat16())
    with torch.no_grad():
        out = model(**batch("llava", dtype=torch.bfloat16))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    mmfast.patch(model, tuning=tuning, verbose=False)  # and it patches again
    assert model.model.language_model.layers[0].input_layernorm.weight.dtype == torch.float32


@pytest.mark.parametrize("cast", [torch.float16, torch.float32])
def test_unpatch_after_casting_the_model_follows_the_cast(cast):
    """A model cast after patching (``model.half()``, ``model.float()``) keeps the cast's dtype on unpatch:
    the master weights are not rounded back to the dtype recorded at patch time (a half() model got bf16
    norm weights back, and its restored forward failed on mixed dtypes; a float() one was rounded to bf16)."""
    model = build("llava", dtype=torch.bfloat16)
    mmfast.patch(model, tuning="layernorm", final_norm=True, verbose=False)
    with torch.no_grad():
        model.model.language_model.norm.weight.add_(1e-3)  # a trained value: kept at the cast's precision
    model.to(cast)
    trained = model.model.language_model.norm.weight.detach().clone()
    mmfast.unpatch(model)
    assert {p.dtype for p in model.parameters()} == {cast}
    assert torch.equal(model.model.language_model.norm.weight, trained)
    with torch.no_grad():
        out = model(**batch("llava", dtype=cast))
    assert out.logits.dtype == cast and torch.isfinite(out.logits).all()


# ---------------------------------------------------------------------------------------------
# trainable state
# ---------------------------------------------------------------------------------------------


def test_save_trainable_unwraps_deepspeed_and_gathers_zero3(tmp_path, monkeypatch):
    """Against stand-ins of DeepSpeed's API, so that it runs where deepspeed is not installed (the real
    ZeRO-3 over two ranks: tests/test_distributed.py): the engine's ``.module`` is
    unwrapped (names without ``module.``), and a ZeRO-3 parameter (``ds_id``, empty ``.data`` outside
    ``deepspeed.zero.GatheredParameters``) is saved gathered, not as the empty partition."""
    import contextlib
    import sys
    import types

    from safetensors.torch import load_file

    model = build("llava")
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    full = {n: p.detach().clone() for n, p in _trainable(model).items()}
    for p in _trainable(model).values():  # partitioned: nothing local until gathered
        p.ds_id, p.ds_full = id(p), p.data
        p.data = torch.empty(0, dtype=p.dtype)

    @contextlib.contextmanager
    def gathered(params, modifier_rank=None):
        for p in params:
            p.data = p.ds_full
        yield
        for p in params:
            p.data = torch.empty(0, dtype=p.dtype)

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    engine = type("DeepSpeedEngine", (torch.nn.Module,), {})()
    engine.module = model
    names = mmfast.save_trainable(engine, tmp_path / "t.safetensors")
    saved = load_file(str(tmp_path / "t.safetensors"))
    assert names == sorted(full) and saved.keys() == full.keys()
    assert all(torch.equal(saved[n], full[n]) for n in full)
    monkeypatch.delitem(sys.modules, "deepspeed")
    monkeypatch.setattr("builtins.__import__", _refusing("deepspeed"))
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        mmfast.save_trainable(engine, tmp_path / "u.safetensors")


def _refusing(name):
    import builtins

    real = builtins.__import__

    def imp(mod, *a, **k):
        if mod == name:
            raise ImportError(f"no {name}")
        return real(mod, *a, **k)

    return imp


def test_save_load_trainable(tmp_path):
    model = build("llava")
    mmfast.patch(model, tuning="layernorm+projector", verbose=False)
    with torch.no_grad():
        for p in _trainable(model).values():
            p.add_(torch.randn_like(p))
    path = tmp_path / "trainable.safetensors"
    names = mmfast.save_trainable(model, path)
    assert names == sorted(_trainable(model))

    fresh = build("llava")
    mmfast.patch(fresh, tuning="layernorm+projector", verbose=False)
    assert mmfast.load_trainable(fresh, path) == names
    for n, p in _trainable(model).items():
        assert torch.equal(p, dict(fresh.named_parameters())[n])
    inputs = batch("llava")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, fresh(**inputs).logits)


def test_save_load_trainable_through_checkpoint_wrappers(tmp_path):
    """A model whose blocks are wrapped for activation checkpointing (torch's checkpoint_wrapper: FSDP's
    recipe, Accelerate's) saves its trainables under the unwrapped model's names (they kept
    ``_checkpoint_wrapped_module.``, and the file did not load into the unwrapped model), and loads a file
    saved unwrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                               checkpoint_wrapper)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = build("llava")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    want = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    path = tmp_path / "wrapped.safetensors"
    assert mmfast.save_trainable(model, path) == sorted(want)
    fresh = build("llava", seed=1)
    mmfast.patch(fresh, tuning="layernorm", verbose=False)
    mmfast.load_trainable(fresh, path)
    assert all(torch.equal(p.detach(), want[n]) for n, p in fresh.named_parameters() if p.requires_grad)
    mmfast.save_trainable(fresh, tmp_path / "plain.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    mmfast.load_trainable(model, tmp_path / "plain.safetensors")
    assert {n: p.detach() for n, p in mmfast.tuning.state._named_trainables(model)}.keys() == want.keys()
    assert all(torch.equal(p.detach(), want[n]) for n, p in mmfast.tuning.state._named_trainables(model))


def test_load_trainable_mismatch(tmp_path):
    from tiny_models import llama_config, llava_config
    from transformers import LlavaForConditionalGeneration

    model = build("llava")
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    path = tmp_path / "t.safetensors"
    mmfast.save_trainable(model, path)

    wider = LlavaForConditionalGeneration(llava_config(text=llama_config(hidden_size=48)))
    mmfast.patch(wider, tuning="layernorm-simp", verbose=False)
    snapshot = copy.deepcopy(wider.state_dict())
    with pytest.raises(ValueError, match="saved shape"):
        mmfast.load_trainable(wider, path)
    assert all(torch.equal(v, wider.state_dict()[k]) for k, v in snapshot.items())  # nothing changed

    more = build("llava")
    mmfast.patch(more, tuning="layernorm+projector", verbose=False)
    with pytest.raises(ValueError, match="not in the file"):
        mmfast.load_trainable(more, path)
    mmfast.load_trainable(more, path, strict=False)

    # a checkpoint of a wider recipe into a narrower one: it would write parameters frozen there
    mmfast.save_trainable(more, tmp_path / "wide.safetensors")
    fewer = build("llava")
    mmfast.patch(fewer, tuning="layernorm-simp", verbose=False)
    snapshot = copy.deepcopy(fewer.state_dict())
    with pytest.raises(ValueError, match="frozen in the model"):
        mmfast.load_trainable(fewer, tmp_path / "wide.safetensors")
    assert all(torch.equal(v, fewer.state_dict()[k]) for k, v in snapshot.items())  # nothing changed
    loaded = mmfast.load_trainable(fewer, tmp_path / "wide.safetensors", strict=False)  # for inference, say
    assert any("multi_modal_projector" in n for n in loaded)
    proj = "model.multi_modal_projector.linear_1.weight"
    assert torch.equal(fewer.get_parameter(proj), more.get_parameter(proj))

    # a model still on the meta device has no memory to load into: copy_ there did nothing, and said nothing
    with torch.device("meta"):
        empty = build_meta_llava()
    mmfast.patch(empty, tuning="layernorm+projector", verbose=False)
    with pytest.raises(ValueError, match="meta device"):
        mmfast.load_trainable(empty, tmp_path / "wide.safetensors")

    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not written by mmfast"):
        mmfast.load_trainable(model, other)
    with pytest.raises(ValueError, match="no trainable"):
        frozen = build("llama")
        for p in frozen.parameters():
            p.requires_grad_(False)
        mmfast.save_trainable(frozen, tmp_path / "none.safetensors")


def _trained_file(tuning: str, path) -> tuple:
    """A LLaVA tuned with ``tuning``, its trainables moved off their start (random), saved to ``path``;
    returns the model and its logits on the tiny batch."""
    model = build("llava").eval()
    mmfast.patch(model, tuning=tuning, verbose=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        ref = model(**_no_labels()).logits
    mmfast.save_trainable(model, path)
    return model, ref


def _no_labels() -> dict:
    return {k: v for k, v in batch("llava").items() if k != "labels"}


@pytest.mark.parametrize("tuning", ["layernorm+projector", "mma"])
@pytest.mark.parametrize("order", ["offload-then-patch", "patch-then-offload"])
def test_save_load_trainable_with_accelerate_cpu_offload(tmp_path, tuning, order):
    """A model offloaded by Accelerate (its weights on meta, loaded by its hooks for each forward): the trained
    norms and projector are loaded into what the hooks load, and saved from there. Both refused before (the
    load's error advised to_empty, which throws the offloaded weights away; the save raised on meta)."""
    from accelerate import cpu_offload
    from safetensors.torch import load_file

    _, ref = _trained_file(tuning, tmp_path / "t.safetensors")
    model = build("llava").eval()
    if order == "offload-then-patch":
        cpu_offload(model, execution_device="cpu")
    mmfast.patch(model, tuning=tuning, verbose=False)
    if order == "patch-then-offload":
        cpu_offload(model, execution_device="cpu")
    proj = model.model.multi_modal_projector.linear_1.weight
    assert proj.is_meta and proj.requires_grad  # offloaded, and trained by the recipe
    with torch.no_grad():
        assert not torch.allclose(model(**_no_labels()).logits, ref)
    loaded = mmfast.load_trainable(model, tmp_path / "t.safetensors")
    assert "model.multi_modal_projector.linear_1.weight" in loaded
    with torch.no_grad():
        assert torch.equal(model(**_no_labels()).logits, ref)
    assert proj.is_meta  # still offloaded
    names = mmfast.save_trainable(model, tmp_path / "again.safetensors")
    assert names == loaded
    saved, again = load_file(tmp_path / "t.safetensors"), load_file(tmp_path / "again.safetensors")
    assert all(torch.equal(saved[n], again[n]) for n in names)


def test_load_trainable_refuses_disk_offloaded_parameters(tmp_path, monkeypatch):
    """Disk offloading reads each weight from its file at every forward: a load into what it read would be
    lost. Refused, naming the way, without reading any file; nothing changed. Saving reads the trainables'
    files alone (it read every offloaded weight: a 7B model's 14 GB for a few MB of norms)."""
    import accelerate.utils.offload as offload
    from accelerate import disk_offload
    from safetensors.torch import load_file

    trained, ref = _trained_file("layernorm", tmp_path / "t.safetensors")
    model = build("llava").eval()
    mmfast.patch(model, tuning="layernorm", verbose=False)
    mmfast.save_trainable(model, tmp_path / "before.safetensors")
    disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    with torch.no_grad():
        before = model(**_no_labels()).logits
    reads = []
    real = offload.load_offloaded_weight
    monkeypatch.setattr(offload, "load_offloaded_weight", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    with pytest.raises(ValueError, match="offloaded to disk by Accelerate"):
        mmfast.load_trainable(model, tmp_path / "t.safetensors")
    assert reads == []
    names = mmfast.save_trainable(model, tmp_path / "again.safetensors")
    assert len(reads) == len(names)  # each trainable once, nothing else
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(model(**_no_labels()).logits, before)
    saved, again = load_file(tmp_path / "before.safetensors"), load_file(tmp_path / "again.safetensors")
    assert names == sorted(saved) and all(torch.equal(saved[n], again[n]) for n in names)


def test_trainable_file_path_errors(tmp_path):
    """A directory, a torch.save file, a missing file: errors that name what was passed and what is wanted
    (they were a bare OSError "No such device", a safetensors header error, an error from the writer)."""
    model = build("llava")
    mmfast.patch(model, tuning="layernorm", verbose=False)
    checkpoint = tmp_path / "checkpoint-500"
    checkpoint.mkdir()
    with pytest.raises(ValueError, match="is a directory; pass the path of the file"):
        mmfast.save_trainable(model, checkpoint)
    with pytest.raises(ValueError, match="is a directory; pass the file save_trainable wrote$"):
        mmfast.load_trainable(model, checkpoint)
    mmfast.save_trainable(model, checkpoint / "mmfast.safetensors")
    with pytest.raises(ValueError, match="is a directory.*it holds .*mmfast.safetensors"):
        mmfast.load_trainable(model, checkpoint)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        mmfast.load_trainable(model, tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="no file"):
        mmfast.load_trainable(model, tmp_path / "missing.safetensors")


@pytest.mark.parametrize("wrap", ["DataParallel", "compile", "compile-blocks"])
def test_save_load_trainable_names_a_wrapped_model_as_unwrapped(tmp_path, wrap):
    """A model inside ``nn.DataParallel`` or ``torch.compile``, or with its blocks compiled one by one (their
    parameters named ``..._orig_mod...``): the file names the trainables, and records the model class, as the
    unwrapped model does (a file that names them otherwise loads into no other model, and its error would
    say it was saved from the wrapper), and it loads into the wrapped and the plain model alike."""
    from safetensors import safe_open

    from mmfast.tuning.state import FORMAT

    def wrapped(model):
        if wrap == "DataParallel":  # (without CUDA it runs the module: no device is needed)
            return torch.nn.DataParallel(model)
        if wrap == "compile":  # (lazy: nothing is compiled without a forward)
            return torch.compile(model)
        layers = model.model.language_model.layers
        for i, layer in enumerate(layers):
            layers[i] = torch.compile(layer)
        assert any("_orig_mod." in n for n, _ in model.named_parameters())
        return model

    model = build("llava")
    mmfast.patch(model, tuning="layernorm+projector", verbose=False)
    with torch.no_grad():
        for p in _trainable(model).values():
            p.add_(torch.randn_like(p))
    want = {n: p.detach().clone() for n, p in _trainable(model).items()}
    path = tmp_path / "wrapped.safetensors"
    assert mmfast.save_trainable(wrapped(model), path) == sorted(want)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == FORMAT and f.metadata()["mmfast"] == mmfast.__version__
        assert f.metadata()["model_class"] == "LlavaForConditionalGeneration"
        assert all(torch.equal(f.get_tensor(n), want[n]) for n in f.keys())
    for fresh in (build("llava", seed=1), wrapped(build("llava", seed=1))):
        mmfast.patch(fresh, tuning="layernorm+projector", verbose=False)
        assert mmfast.load_trainable(fresh, path) == sorted(want)
        assert all(torch.equal(p.detach(), want[n]) for n, p in mmfast.tuning.state._named_trainables(fresh))


@pytest.mark.parametrize("offloaded", [False, True])
def test_load_trainable_refuses_a_tensor_of_another_shape_or_integers_before_changing_anything(tmp_path, offloaded):
    """Each saved tensor must have its parameter's shape and, for a floating parameter, a floating dtype: a norm
    weight saved as one value (which ``copy_`` broadcast over the row) or as integers (which it cast) is refused
    with the reason, in a plain model and in one Accelerate offloaded (where the values go into what its
    hooks load), before anything changes."""
    from accelerate import cpu_offload
    from safetensors.torch import save_file

    from mmfast.tuning.state import FORMAT

    model = build("llava").eval()
    mmfast.patch(model, tuning="layernorm+projector", verbose=False)
    moved = {n: p.detach() + 0.5 for n, p in _trainable(model).items()}
    norm = "model.language_model.layers.1.post_attention_layernorm.weight"
    assert norm in moved and sorted(moved).index(norm) > 0  # (a tensor before it in the load's order)
    if offloaded:
        cpu_offload(model, execution_device="cpu")
        assert model.get_parameter(norm).is_meta
    with torch.no_grad():
        before = model(**_no_labels()).logits
    path = tmp_path / "bad.safetensors"
    width = moved[norm].shape[0]
    for words, bad in ((fr"saved shape \(1,\) != model's \({width},\)", moved[norm][:1].clone()),
                       ("saved as torch.int64, the model's parameter is torch.float32",
                        torch.ones(moved[norm].shape, dtype=torch.int64))):
        save_file({**moved, norm: bad}, str(path), metadata={"format": FORMAT})
        with pytest.raises(ValueError, match=f"{norm}: {words}"):
            mmfast.load_trainable(model, path)
        with torch.no_grad():
            assert torch.equal(model(**_no_labels()).logits, before)
    save_file(moved, str(path), metadata={"format": FORMAT})
    mmfast.load_trainable(model, path)
    with torch.no_grad():
        assert not torch.equal(model(**_no_labels()).logits, before)


def test_save_load_trainable_under_ddp_and_fsdp2_in_a_group_of_one(tmp_path):
    """In a process group (one rank: gloo, in this process): DDP's model is saved under its own names (not
    ``module.``); an FSDP2 (``fully_shard``) model's DTensor shards are saved as full tensors; a load into the
    sharded model is refused, naming the way (load before fully_shard), before anything changes (a copy into
    the DTensor raised torch's mixed-tensor error part way)."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        models = []
        for _ in range(2):
            model = build("llama")
            mmfast.patch(model, tuning="layernorm-simp", verbose=False)
            models.append(model)
        with torch.no_grad():
            for p in _trainable(models[0]).values():
                p.add_(torch.randn_like(p))
        want = {n: p.detach().clone() for n, p in _trainable(models[0]).items()}
        path = tmp_path / "ddp.safetensors"
        assert mmfast.save_trainable(DDP(models[0]), path) == sorted(want)
        saved = load_file(str(path))
        assert all(torch.equal(saved[n], want[n]) for n in want)
        sharded = fully_shard(models[1], mesh=init_device_mesh("cpu", (1,)))
        before = {n: p.full_tensor().clone() for n, p in _trainable(sharded).items()}
        assert before.keys() == want.keys() and all(hasattr(p, "full_tensor") for p in _trainable(sharded).values())
        with pytest.raises(ValueError, match="sharded \\(DTensor\\) parameter; load before fully_shard"):
            mmfast.load_trainable(sharded, path)
        assert all(torch.equal(p.full_tensor(), before[n]) for n, p in _trainable(sharded).items())
        mmfast.save_trainable(sharded, tmp_path / "fsdp2.safetensors")
        resaved = load_file(str(tmp_path / "fsdp2.safetensors"))
        assert resaved.keys() == before.keys() and all(type(t) is torch.Tensor for t in resaved.values())
        assert all(torch.equal(resaved[n], before[n]) for n in before)
    finally:
        dist.destroy_process_group()


def test_a_weights_map_that_reads_each_value_afresh_is_taken_for_disk(tmp_path):
    """An offloading hook's weights map of another kind than Accelerate's (a mapping this code does not know)
    is asked: one that hands out the same tensor at each access is memory (a load writes what the next
    forward runs with); one that hands out a fresh copy at each access reads its values from elsewhere (a
    file), and a load into a copy would be lost without a word: refused, as disk offloading is."""
    from collections.abc import Mapping

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    class Store(Mapping):
        def __init__(self, values, fresh):
            self.values, self.fresh = values, fresh

        def __getitem__(self, key):
            return self.values[key].clone() if self.fresh else self.values[key]

        def __iter__(self):
            return iter(self.values)

        def __len__(self):
            return len(self.values)

    torch.manual_seed(0)
    x = torch.randn(3, 8)
    trained = torch.nn.Sequential(torch.nn.Linear(8, 8))
    path = tmp_path / "t.safetensors"
    mmfast.save_trainable(trained, path)
    for fresh in (False, True):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        store = Store({n: p.detach().clone() for n, p in model[0].named_parameters()}, fresh)
        add_hook_to_module(model[0], AlignDevicesHook(execution_device="cpu", offload=True, weights_map=store))
        assert model[0].weight.is_meta
        with torch.no_grad():
            before = model(x)
        if fresh:
            with pytest.raises(ValueError, match="0.weight: offloaded to disk"):
                mmfast.load_trainable(model, path)
            with torch.no_grad():
                assert torch.equal(model(x), before)
        else:
            assert mmfast.load_trainable(model, path) == ["0.bias", "0.weight"]
            with torch.no_grad():
                assert torch.equal(model(x), trained(x))


def _simp_trains_the_block_norms(model, layers: str, mlp_norm: str | tuple, vocab: int) -> None:
    """tuning="layernorm-simp" on a two-block model trains exactly each block's input_layernorm and
    ``mlp_norm`` (one name, or the names of several feed-forward input norms), and a step gives each of
    them a gradient."""
    mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    names = ("input_layernorm", *((mlp_norm,) if isinstance(mlp_norm, str) else mlp_norm))
    assert trained == [f"{layers}.{i}.{k}.weight" for i in range(2) for k in names]
    ids = torch.randint(1, vocab, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trained)


def test_master_weights_of_a_norm_left_unpatched_keep_its_output_dtype():
    """A norm the fused kernels do not take (a user's own forward, here around Llama 4's: the normalised
    input, rounded, times the weight) is left unpatched. master_weights widened its weight to fp32 all the
    same, so in a bf16 model it returned fp32 into bf16 projections and the first forward failed (mixed
    dtypes in a matmul). Its output goes back to bf16: the model computes as unpatched (the product of two
    bf16 values, rounded once, is the same) while the weight trains in fp32."""

    import transformers as T
    from transformers.models.llama4.modeling_llama4 import Llama4TextRMSNorm

    class OwnNorm(Llama4TextRMSNorm):
        def forward(self, x):
            return super().forward(x)

    torch.manual_seed(0)
    model = T.Llama4ForCausalLM(T.Llama4TextConfig(**llama4_text_config())).to(torch.bfloat16)
    for m in model.modules():
        if type(m) is Llama4TextRMSNorm:
            m.__class__ = OwnNorm
    ref = copy.deepcopy(model)
    ids = torch.randint(1, 100, (2, 8))
    report = mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    norm = model.model.layers[0].input_layernorm
    assert "model.layers.0.input_layernorm" not in report.patched and norm.weight.dtype == torch.float32
    out = model(input_ids=ids, labels=ids)
    expected = ref(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    out.loss.backward()
    assert norm.weight.grad.dtype == torch.float32 and norm.weight.grad.abs().sum() > 0
    mmfast.unpatch(model)
    assert not norm._forward_hooks and norm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)


def test_a_norm_left_unpatched_cast_after_patching_runs_as_cast():
    """A recipe norm mmfast leaves unpatched (a user's own class) in a bf16 model, the model then cast to fp16
    (``model.half()``, HF Trainer's ``fp16_full_eval``): the hook that keeps the norm's output in the dtype it
    had cast it to fp16 promoted with the bf16 recorded at patch time, fp32, and the fp16 projection after it
    failed. The cast took the weight out of fp32: the norm's own forward computes as its class does."""
    from torch import nn

    class OwnRMSNorm(nn.Module):  # HF LlamaRMSNorm's computation, the user's own code
        def __init__(self, n, eps=1e-6):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(n)), eps

        def forward(self, x):
            h = x.float()
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    model = build("llava")
    for layer in model.model.language_model.layers:
        layer.input_layernorm = OwnRMSNorm(layer.input_layernorm.weight.shape[0])
    model.to(torch.bfloat16)
    ref = copy.deepcopy(model)
    report = mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    assert not any("input_layernorm" in n for n in report.patched)
    model.half().eval()
    ref.half().eval()
    inputs = batch("llava", seed=3, dtype=torch.float16)
    with torch.no_grad(), warnings.catch_warnings(), mmfast.disabled():  # (the fused kernels' fp16 rounding aside)
        warnings.simplefilter("ignore")  # (the cast warning is not what this is about)
        out, expected = model(**inputs), ref(**inputs)
    assert out.logits.dtype == torch.float16
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)


def test_llama4_recipes_find_the_decoder_below_its_causal_lm():
    """Llama 4's text model is a causal LM whose ``get_decoder()`` hands back itself (its decoder sits at
    ``.model``): every recipe was refused as if it had no LLaMA-style layers."""
    import transformers as T

    tc = llama4_text_config()
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=8, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5)
    torch.manual_seed(0)
    model = T.Llama4ForConditionalGeneration(T.Llama4Config(text_config=tc, vision_config=vc, image_token_index=127))
    # (the report named no LM head: "n/a (no lm_head)")
    assert mmfast.patch(copy.deepcopy(model), verbose=False).fused_loss.startswith(
        "not installed: the LM head is language_model.lm_head")
    _simp_trains_the_block_norms(model, "language_model.model.layers", "post_attention_layernorm", vocab=100)


def test_unpatch_refuses_what_a_distributed_wrapper_holds(tmp_path):
    """unpatch on a wrapped model: rounding fp32 master weights back to bf16 changed parameters FSDP2
    re-gathers as fp32 (the next forward failed on mixed dtypes) and DDP's reducer stopped seeing their
    gradients (its error then blamed unused parameters); removing MMA's modules under DDP left its
    reducer waiting for their gradients. Refused now, before anything changes; what changes nothing
    the wrapper holds still unpatches."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mmfast.tuning.mma import added_modules

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        model = build("llava")
        mmfast.patch(model, tuning="mma", verbose=False)
        with pytest.raises(ValueError, match="remove the MMA adapters .* inside DistributedDataParallel"):
            mmfast.unpatch(DDP(model))
        assert added_modules(model)
        for wrap in (DDP, lambda m: fully_shard(m, mesh=init_device_mesh("cpu", (1,)))):
            model = build("llama", dtype=torch.bfloat16)
            mmfast.patch(model, tuning="layernorm-simp", verbose=False)
            wrapped = wrap(model)
            with pytest.raises(ValueError, match="round the fp32 master norm weights"):
                mmfast.unpatch(wrapped)
            assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
        model = build("llama")
        mmfast.patch(model, tuning="layernorm-simp", verbose=False)
        assert mmfast.unpatch(DDP(model)) > 0  # fp32: nothing the wrapper holds changes
        # tensor parallelism (DTensor projections, plain norms) holds no copy of the norms: not refused
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        model = build("llama", dtype=torch.bfloat16)
        mmfast.patch(model, tuning="layernorm-simp", verbose=False)
        parallelize_module(model.model.layers[0].self_attn, init_device_mesh("cpu", (1,)), {"q_proj": ColwiseParallel()})
        assert mmfast.unpatch(model) > 0
        assert model.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["gemma3", "vaultgemma"])
def test_the_mlp_input_norm_of_sandwich_norm_blocks(family):
    """Gemma 2/3 layers have sandwich norms: ``post_attention_layernorm`` normalises the attention's output,
    and ``pre_feedforward_layernorm`` is the MLP's input norm, the one LLaMA's ``post_attention_layernorm``
    is: the recipes trained the former by its name. VaultGemma's layers have no post_attention_layernorm
    at all, and were refused."""
    import transformers as T

    shape = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=64)
    if family == "gemma3":
        model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(**shape, sliding_window=4,
                                                       layer_types=["sliding_attention", "full_attention"]))
    else:
        model = T.VaultGemmaForCausalLM(T.VaultGemmaConfig(**shape))
    _simp_trains_the_block_norms(model, "model.layers", "pre_feedforward_layernorm", vocab=64)


@pytest.mark.parametrize("tuning", ["layernorm", "layernorm+projector", "mma", "layernorm-simp"])
def test_llava_next_image_newline_trains_with_the_projector(tuning, tmp_path):
    """LLaVA-NeXT's learned end-of-row embedding (``image_newline``, beside the projector on the model) goes
    into every image's features: it trains with the projector (it stayed frozen, though the features
    through it train), gets a gradient, and is saved; a recipe without the projector keeps it frozen."""
    import transformers as T
    from tiny_models import IMAGE_SIZE, VOCAB, clip_vision_config, llama_config

    cfg = T.LlavaNextConfig(text_config=llama_config().to_dict(), vision_config=clip_vision_config().to_dict(),
                            image_token_index=VOCAB - 1, image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]])
    torch.manual_seed(0)
    model = T.LlavaNextForConditionalGeneration(cfg)
    opts = {"mma": mmfast.MMAOptions(dropout=0.0)} if tuning == "mma" else {}
    report = mmfast.patch(model, tuning=tuning, verbose=False, **opts)
    newline = model.model.image_newline
    trains = tuning != "layernorm-simp"
    assert newline.requires_grad == trains
    ids = torch.randint(0, VOCAB - 2, (1, 14))
    ids[0, 1:11] = VOCAB - 1  # one 2x2-patch image, its base and one tile: 10 tokens with the row ends
    model(input_ids=ids, pixel_values=torch.randn(1, 2, 3, IMAGE_SIZE, IMAGE_SIZE),
          image_sizes=torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]]), labels=ids).loss.backward()
    assert (newline.grad is not None and newline.grad.abs().sum() > 0) == trains
    names = mmfast.save_trainable(model, tmp_path / "t.safetensors")
    assert ("model.image_newline" in names) == trains
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_gemma4_moe_blocks_train_the_experts_input_norm_too():
    """A Gemma 4 block with a mixture of experts runs it beside the MLP, on the residual stream normalised by
    its own ``pre_feedforward_layernorm_2``: the recipes trained the MLP's input norm only, so the experts'
    input stayed frozen. Both feed-forward input norms train and get a gradient (dense blocks: one, as in
    test_the_mlp_input_norm_of_sandwich_norm_blocks)."""
    import transformers as T

    if not hasattr(T, "Gemma4TextConfig"):
        pytest.skip(f"transformers {T.__version__} has no Gemma 4")
    cfg = T.Gemma4TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=64,
                             sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                             hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=4, top_k_experts=2,
                             moe_intermediate_size=16)
    torch.manual_seed(0)
    _simp_trains_the_block_norms(T.Gemma4ForCausalLM(cfg), "model.layers",
                                 ("pre_feedforward_layernorm", "pre_feedforward_layernorm_2"), vocab=64)


@pytest.mark.parametrize("family,projector,siblings", [
    ("Gemma4", "model.embed_vision", []),
    ("LightOnOcr", "model.vision_projection", []),
    ("MuseGlimmer", "model.vision_projection", ["model.vision_adapter"]),
    ("PaddleOCRVL", "model.projector", []),
    ("VideoLlama3", "model.projector", []),
    ("HyperCLOVAXVisionV2", "model.projector", ["model.vision_model.merger"]),
    ("Ovis2", "model.visual_embeddings_table", ["model.vision_tower.head_linear", "model.vision_tower.head_norm"]),
    ("HYV4VL", "model.vision_tower.patch_merger", []),
    ("Mistral3", "model.multi_modal_projector", []),  # (it holds a patch_merger: the whole connector is taken)
    ("Qwen3VL", "model.visual.merger", ["model.visual.deepstack_merger_list"]),
])
def test_the_projector_each_family_has(family, projector, siblings):
    """The vision-to-language connector the projector recipes train, found by name: these families' names
    were not looked for, so "layernorm" trained no projector in them (and "layernorm+projector" was refused),
    and HyperCLOVAX's merger was taken for its whole connector, its final projection left frozen. Built on
    the meta device with the family's default config."""
    import transformers as T

    from mmfast.tuning.recipes import find_parts

    cls = getattr(T, f"{family}ForConditionalGeneration", None)
    if cls is None:
        pytest.skip(f"transformers {T.__version__} has no {family}")
    cfg = cls.config_class(**({"vision_config": {}, "audio_config": {}} if family == "Gemma4" else {}))
    with torch.device("meta"):
        model = cls(cfg)
    paths = {id(m): n for n, m in model.named_modules()}
    parts = find_parts(model)
    assert paths[id(parts.projector)] == projector
    assert [paths[id(m)] for m in parts.projector_siblings] == siblings


@pytest.mark.parametrize("tuning", ["mma", "layernorm", "layernorm+projector"])
def test_a_quantized_projector_is_refused_before_anything_changes(tuning):
    """A 4-bit or 8-bit model (bitsandbytes) keeps its projector's weights as integers, which cannot require
    grad. The recipes that train the projector raised torch's "only Tensors of floating point dtype can
    require gradients" after they had patched the norms, widened them to fp32 and frozen the model (MMA:
    inserted its adapters too, so any other recipe was refused next). Now refused first, naming the modules
    and how to load them unquantized; the norm-only recipe still applies."""
    from mmfast.tuning.mma import added_modules

    model = build("llava")
    linear = model.model.multi_modal_projector.linear_1
    packed = torch.randint(0, 255, (linear.weight.numel() // 2, 1), dtype=torch.uint8)  # as Params4bit keeps it
    linear.weight = torch.nn.Parameter(packed, requires_grad=False)
    before = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"model\.multi_modal_projector\.linear_1, whose weights are quantized "
                                         r"\(Parameter of torch\.uint8\).*llm_int8_skip_modules"):
        mmfast.patch(model, tuning=tuning, verbose=False)
    assert {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()} == before
    assert not added_modules(model) and not any("_mmfast_patch" in m.__dict__ for m in model.modules())
    report = mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    assert report.trainable_params and not linear.weight.requires_grad


class Params4bit(torch.nn.Parameter):
    """Stands in for bitsandbytes' 4-bit weight (counted by its class name, as PEFT counts it): two 4-bit
    values in each byte of its uint8 storage."""


def test_the_parameter_count_counts_4bit_weights_as_their_values():
    """The trainable-parameter line (PEFT's format) counted a 4-bit weight by its packed bytes, half its
    values, which overstated trainable% (0.366 instead of 0.240 on a tiny 4-bit LLaMA)."""
    model = build("llama")
    full = mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    proj = model.model.layers[0].mlp.up_proj
    packed = torch.zeros(proj.weight.numel() // 2, 1, dtype=torch.uint8)
    proj.weight = Params4bit(packed, requires_grad=False)
    report = mmfast.patch(model, tuning="layernorm-simp", verbose=False)
    assert (report.trainable_params, report.all_params) == (full.trainable_params, full.all_params)


def test_tied_embeddings_are_counted_once():
    """A LLaMA whose LM head shares the input embeddings' weight (tie_word_embeddings): the report counts the
    shared weight once, as model.parameters() and PEFT do (counting it twice overstated both counts by the
    vocabulary's embedding, trainable ones too under tuning='layernorm')."""
    from transformers import LlamaForCausalLM

    from tiny_models import llama_config

    model = LlamaForCausalLM(llama_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = mmfast.patch(model, tuning="layernorm", verbose=False)
    unique = {id(p): p for m in model.modules() for p in m.parameters(recurse=False)}
    assert report.all_params == sum(p.numel() for p in unique.values())
    assert report.trainable_params == sum(p.numel() for p in unique.values() if p.requires_grad)
    assert report.trainable_params >= model.lm_head.weight.numel()  # (the shared weight trains, once)


def test_prepare_for_kbit_training_after_patch_warns_that_the_recipe_froze(monkeypatch):
    """patch, then PEFT's prepare_model_for_kbit_training (the QLoRA setup) freezes every parameter: nothing
    trained at all, and the watch took "nothing trains" for an evaluation and said nothing. Now a training
    forward says so, once for each model; an evaluation in eval mode says nothing."""
    import warnings

    from peft import prepare_model_for_kbit_training

    monkeypatch.setattr("mmfast.ops.backend._warned", set())
    said = []
    for _ in range(2):
        model = build("llama")
        mmfast.patch(model, tuning="layernorm-simp", verbose=False)
        model = prepare_model_for_kbit_training(model)
        assert not any(p.requires_grad for p in model.parameters())
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model.eval()
            model(**batch("llama"))
            model.train()
            model(**batch("llama"))
            model(**batch("llama"))
        said += [str(w.message) for w in seen if "froze them after mmfast.patch" in str(w.message)]
    assert len(said) == 2 and all("nor does any other" in m and "prepare_model_for_kbit_training" in m for m in said)
