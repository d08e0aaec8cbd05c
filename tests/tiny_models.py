"""Tiny random-init HuggingFace models built in the tests (no downloads), and batches for them."""

from __future__ import annotations

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

VOCAB = 64
IMAGE_TOKEN = VOCAB - 1
IMAGE_SIZE, PATCH = 28, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # LLaVA drops CLS: one token per patch


def llama_config(**kw) -> LlamaConfig:
    cfg = dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaConfig(**cfg)


def clip_vision_config(**kw) -> CLIPVisionConfig:
    cfg = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=16)
    cfg.update(kw)
    return CLIPVisionConfig(**cfg)


def llama4_text_config(**kw) -> dict:
    """A tiny Llama 4 text model (two layers: one MoE, one dense MLP) as ``Llama4TextConfig`` arguments."""
    cfg = dict(hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128, num_local_experts=2,
               num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 1], attention_chunk_size=16,
               max_position_embeddings=64, pad_token_id=0)
    cfg.update(kw)
    return cfg


def llava_config(text=None, vision=None) -> LlavaConfig:
    return LlavaConfig(vision_config=vision or clip_vision_config(), text_config=text or llama_config(),
                       image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, projector_hidden_act="gelu")


def build(kind: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    if kind == "llama":
        m = LlamaForCausalLM(llama_config())
    elif kind == "clip-vision":
        m = CLIPVisionModel(clip_vision_config())
    elif kind == "clip-text":
        m = CLIPTextModel(CLIPTextConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=32))
    elif kind == "siglip-vision":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        m = SiglipVisionModel(SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                                 num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH))
    elif kind == "llava":
        m = LlavaForConditionalGeneration(llava_config())
    else:
        raise ValueError(kind)
    with torch.no_grad():  # norms start at 1/0; make them non-trivial so errors in them show
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m.to(dtype)


def batch(kind: str, seed: int = 1, B: int = 2, S: int = 12, dtype=torch.float32, images=None) -> dict:
    """Inputs for ``kind``; for llava, ``images`` says which samples carry an image (default: all)."""
    g = torch.Generator().manual_seed(seed)
    if kind in ("clip-vision", "siglip-vision"):
        return {"pixel_values": torch.randn(B, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(dtype)}
    ids = torch.randint(0, VOCAB - 1, (B, S), generator=g)
    if kind == "clip-text":
        return {"input_ids": ids}
    out = {"input_ids": ids, "labels": ids.clone()}
    if kind == "llava":
        images = [True] * B if images is None else images
        for i, has in enumerate(images):
            if has:
                out["input_ids"][i, 1:1 + IMAGE_TOKENS] = IMAGE_TOKEN
                out["labels"][i, 1:1 + IMAGE_TOKENS] = -100
        n = sum(images)
        if n:
            out["pixel_values"] = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(dtype)
    return out


def lora_llama(seed: int, targets: list[str]):
    """The tiny LLaMA under PEFT LoRA on ``targets``, its B matrices non-zero (they start at zero) so the
    adapters' gradient paths are non-trivial."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama", seed), LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def first_output(out) -> torch.Tensor:
    """The main output tensor of a model call (logits, or the last hidden state)."""
    for key in ("logits", "last_hidden_state"):
        if key in out:
            return out[key]
    raise KeyError(list(out.keys()))


def llava_7b_config() -> LlavaConfig:
    """LLaVA-1.5-7B's shapes (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14 at 336 px, 2-layer MLP projector,
    LLaMA-7B, vocab 32064 (LLaMA's 32000, the image and pad tokens, padded to a multiple of 64)."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                       projector_hidden_act="gelu")


#: The FSDP1 save cases of tests/test_distributed.py (see dist_worker.save_fsdp1).
FSDP1_CASES = ("wrapped", "tied", "before-forward", "flat-params")


def build_fsdp1_case(case: str):
    """The patched and tuned model of an FSDP1 save case (the same in every rank and in the test)."""
    import mmfast
    from transformers import LlavaForConditionalGeneration

    if case == "tied":
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(llava_config(text=llama_config(tie_word_embeddings=True)))
    elif case == "flat-params":  # many trainable units (two norms a layer): many summons
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(llava_config(text=llama_config(num_hidden_layers=16)))
    else:
        model = build("llava", seed=0)
    mmfast.patch(model, tuning="layernorm-simp" if case == "before-forward" else "layernorm", verbose=False)
    return model
