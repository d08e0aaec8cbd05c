"""Model-level benchmark: a LLaVA-shaped training step (vision tower + projector + LLaMA layers, loss,
backward, AdamW step) under each tuning recipe: tokens per second and peak memory.

Providers:

* ``hf-eager``: transformers' own forwards. The same parameters train; LayerNorm-tuning norms stay in
  the model dtype (as PEFT's LN tuning keeps them: HF's RMSNorm cannot take fp32 weights in a bf16
  model), MMA adapters run as a LaVIN-style PyTorch composition;
* ``mmfast``: ``mmfast.patch(model, tuning=...)`` (fused norms, adapter and SwiGLU gate, fp32 master
  weights, the fused LM-head loss);
* ``mmfast-noloss``: the same with ``fused_loss=False``, so the loss's share of the difference shows;
* ``liger``: what a Liger-Kernel user runs: ``apply_liger_kernel_to_llava(model=model)`` with its
  defaults (on the LLaMA: RoPE, RMSNorm, SwiGLU MLP and the fused linear cross-entropy; Liger has no
  CLIP kernels) after the recipe's parameter selection (GPU, when importable; LayerNorm tuning only).
  Liger's patch also rebinds module globals of transformers (the RoPE function, the norm and MLP
  classes); they are restored when the case ends, so later cases in the run are not affected;
* ``liger-norms``: Liger's norm kernels alone, on the modules mmfast patches (LLaMA RMSNorms and CLIP
  LayerNorms), which isolates the norm kernels' share.

Run only when named (``--providers``), since each compiles the whole model first (minutes on a GPU):

* ``hf-compile``: ``hf-eager``'s model under ``torch.compile`` (Inductor, default mode), what HF
  Trainer's ``torch_compile=True`` runs;
* ``mmfast-compile``: ``mmfast``'s patched model under ``torch.compile``; the compiled graph holds
  mmfast's custom ops (norms, adapter, MLP gates, the fused loss).

Under compile the bytes kept for backward are not counted (the counting hooks would be traced too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import importlib.util
import statistics
import time
from typing import Any

import torch
from torch import nn

import mmfast
from ..nn.adapter import MMAdapter
from ..ops.backend import backends_used
from ..patching import unpatch_norms

TUNINGS = ("layernorm", "layernorm-simp", "mma")
#: Samples per GPU model step: LLaVA-1.5's per-device batch in its visual instruction tuning (16 a GPU,
#: 128 over 8 GPUs), the recipe LayerNorm tuning finetunes with.
LLAVA_BATCH = 16


@dataclasses.dataclass(frozen=True)
class ModelCase:
    tuning: str
    llm_layers: int
    vision_layers: int
    hidden: int  # LLM width
    intermediate: int
    heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    image_size: int
    patch: int
    vocab: int
    batch: int
    text_tokens: int  # per sample, besides the image tokens
    dtype: torch.dtype = torch.bfloat16
    op: str = "llava-train-step"

    @property
    def name(self) -> str:
        return f"{self.op}[{self.tuning}]"

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def M(self) -> int:  # tokens per step
        return self.batch * (self.image_tokens + self.text_tokens)

    @property
    def N(self) -> int:
        return self.hidden


def llava_7b_widths(tuning: str, llm_layers: int, batch: int, text_tokens: int) -> ModelCase:
    """CLIP ViT-L/14 at 336 px (576 image tokens), 2-layer projector, LLaMA-7B widths."""
    return ModelCase(tuning, llm_layers, 24, 4096, 11008, 32, 1024, 4096, 16, 336, 14, 32064, batch, text_tokens)


def tiny(tuning: str) -> ModelCase:
    return ModelCase(tuning, 2, 2, 64, 128, 4, 32, 64, 4, 28, 14, 128, 2, 12, torch.float32)


def build_model(case: ModelCase, device: torch.device) -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=case.vision_hidden, intermediate_size=case.vision_intermediate,
                              num_hidden_layers=case.vision_layers, num_attention_heads=case.vision_heads,
                              image_size=case.image_size, patch_size=case.patch, projection_dim=case.vision_hidden)
    text = LlamaConfig(hidden_size=case.hidden, intermediate_size=case.intermediate, num_hidden_layers=case.llm_layers,
                       num_attention_heads=case.heads, num_key_value_heads=case.heads, vocab_size=case.vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=case.vocab - 1,
                      vision_feature_layer=-2, projector_hidden_act="gelu")
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg)
    return model.to(case.dtype).train()


def make_batch(case: ModelCase, device: torch.device) -> dict:
    B, T = case.batch, case.image_tokens + case.text_tokens
    ids = torch.randint(0, case.vocab - 1, (B, T), device=device)
    ids[:, 1:1 + case.image_tokens] = case.vocab - 1
    labels = ids.clone()
    labels[:, 1:1 + case.image_tokens] = -100
    pix = torch.randn(B, 3, case.image_size, case.image_size, device=device, dtype=case.dtype)
    return {"input_ids": ids, "labels": labels, "pixel_values": pix}


#: The compiled providers and the provider whose model each compiles (module docstring).
COMPILED = {"hf-compile": "hf-eager", "mmfast-compile": "mmfast"}
#: Providers that run only when asked for by name: the compiled ones.
OPT_IN = tuple(COMPILED)
#: The ``torch.compile`` backend of the ``*-compile`` providers.
COMPILE_BACKEND = "inductor"


def providers(device: torch.device, opt_in: tuple[str, ...] = ()) -> list[str]:
    """The providers run by default on ``device``, then those of :data:`OPT_IN` named in ``opt_in``."""
    names = ["hf-eager", "mmfast-noloss", "mmfast"]
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        names += ["liger-norms", "liger"]
    return names + [n for n in OPT_IN if n in opt_in]


def _liger_rms(module, x):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return LigerRMSNormFunction.apply(x, module.weight, module.variance_epsilon, 0.0, "llama")


def _liger_ln(module, x):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return LigerLayerNormFunction.apply(x, module.weight, module.bias, module.eps)


def prepare(model: nn.Module, provider: str, tuning: str) -> None:
    """Apply ``tuning`` the way ``provider`` runs it (see the module docstring; the ``*-compile`` providers
    are compiled by the caller)."""
    provider = COMPILED.get(provider, provider)
    if provider in ("mmfast", "mmfast-noloss"):
        mmfast.patch(model, tuning=tuning, fused_loss=provider == "mmfast", verbose=False)
        return
    if provider.startswith("liger") and tuning == "mma":
        raise ValueError("Liger has no MMA adapter")
    # hf-eager and liger*: the recipe's parameter selection, then the original forwards back
    mmfast.patch(model, tuning=tuning, master_weights=False, fused_loss=False, fused_mlp=False, verbose=False)
    unpatch_norms(model)
    for m in model.modules():
        if isinstance(m, MMAdapter):
            m.impl = "eager"
    if provider == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llava

        apply_liger_kernel_to_llava(model=model)
    elif provider == "liger-norms":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        for m in model.modules():
            if isinstance(m, LlamaRMSNorm):
                m.forward = functools.partial(_liger_rms, m)
            elif isinstance(m, nn.LayerNorm):
                m.forward = functools.partial(_liger_ln, m)


#: Where Liger's patch functions rebind globals (module functions and classes, model-class forwards).
_LIGER_GLOBALS = ("transformers.models.llama.modeling_llama", "transformers.models.llava.modeling_llava",
                  "transformers.models.clip.modeling_clip", "transformers.loss.loss_utils")


@contextlib.contextmanager
def restored_globals(provider: str):
    """For the ``liger`` provider: when the block ends, undo what Liger's patch did to the modules it
    touches: module globals and class attributes it set to its own objects (added ones removed,
    replaced ones put back), class names it rewrote, ``F.cross_entropy``. Other changes in the block
    (transformers' own caches) are left alone. A no-op for other providers."""
    if provider != "liger":
        yield
        return
    import importlib

    mods = [importlib.import_module(name) for name in _LIGER_GLOBALS]
    classes = [v for m in mods for v in vars(m).values() if isinstance(v, type) and v.__module__ == m.__name__]
    saved = [(m, dict(vars(m))) for m in mods] + [(c, dict(vars(c))) for c in classes]
    names = [(c, c.__name__, c.__qualname__) for c in classes]
    fn = torch.nn.functional.cross_entropy
    try:
        yield
    finally:
        torch.nn.functional.cross_entropy = fn
        for c, name, qualname in names:
            c.__name__, c.__qualname__ = name, qualname
        for owner, before in saved:
            for key, value in list(vars(owner).items()):
                if before.get(key, _MISSING) is value or not _from_liger(value):
                    continue
                if key in before:
                    setattr(owner, key, before[key])
                else:
                    delattr(owner, key)


def _from_liger(value) -> bool:
    inner = getattr(value, "__func__", value)
    return (getattr(inner, "__module__", None) or "").startswith("liger_kernel")


_MISSING = object()


PARTS = ("norms", "adapter", "attention", "mlp", "projector", "other")


def model_part(name: str, module: nn.Module) -> str:
    """Which part of the model a module belongs to, for the breakdown of saved activations."""
    kind = type(module).__name__.lower()
    leaf = name.rsplit(".", 1)[-1].lower()
    if isinstance(module, MMAdapter) or "adapter" in leaf:
        return "adapter"
    if "norm" in kind or "norm" in leaf:
        return "norms"
    for part, keys in (("attention", ("self_attn", "attention")), ("mlp", ("mlp",)),
                       ("projector", ("multi_modal_projector",))):
        if any(k in name for k in keys):
            return part
    return "other"  # embeddings, patch embedding, LM head, loss


def saved_activation_bytes(model: nn.Module, forward, part=None) -> dict[str, int]:
    """Bytes autograd keeps for the backward of ``forward()`` (which returns the loss) and that backward
    reads: every storage once, parameters and buffers left out, attributed to the innermost module running
    when it was saved (:data:`PARTS`, or ``part(name, module)`` when given; ``total`` too). What a branch
    the loss does not reach saves (LLaVA's last CLIP layer, whose output the model drops) is freed with
    its output before backward, so it is not counted. Device independent: the same on CPU and GPU but for
    the attention kernel's own choice of what to save."""
    keys = PARTS if part is None else ()
    part = part or model_part
    names = {id(m): (n, m) for n, m in model.named_modules()}
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    stack: list[str] = [part("", model)]  # work outside any submodule (the loss, say)
    # by address, each storage held until the count is done: a freed storage's address is soon another's
    seen: dict[int, tuple[str, int, Any]] = {}
    read: set[int] = set()

    def pre(module, args):
        n, m = names.get(id(module), ("", module))
        stack.append(part(n, m) if n else stack[-1])

    def post(module, args, out):
        stack.pop()

    def pack(t):
        try:
            storage = t.untyped_storage()
        except Exception:  # noqa: BLE001 - a tensor without storage (a subclass, say) owns no bytes here
            return t
        key = storage.data_ptr()
        if key not in owned and key not in seen:
            seen[key] = (stack[-1], storage.nbytes(), storage)
        # detached: a node that saves its own output would otherwise hold the output, whose grad_fn is the
        # node, through this hook, a cycle through C++ that gc cannot free (a branch backward never runs
        # would stay allocated for the rest of the process)
        return key, t.detach()

    def unpack(packed):
        if isinstance(packed, tuple):
            read.add(packed[0])
            return packed[1]
        return packed

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            loss = forward()
    finally:
        for h in handles:
            h.remove()
    loss.backward()
    counted = [(where, nbytes) for key, (where, nbytes, _) in seen.items() if key in read]
    out = dict.fromkeys(keys, 0)
    for where, nbytes in counted:
        out[where] = out.get(where, 0) + nbytes
    out["total"] = sum(nbytes for _, nbytes in counted)
    return out


def backends_summary(used: dict) -> str:
    """``"layer_norm triton, rms_norm cuda+triton, ..."``: which backends ran each mmfast op in a step
    (from :func:`mmfast.backends_used`); empty where none ran."""
    per_op: dict[str, set] = {}
    for use in used:
        per_op.setdefault(use.op, set()).add(use.backend)
    return ", ".join(f"{op} {'+'.join(sorted(b))}" for op, b in sorted(per_op.items()))


def time_train_step(case: ModelCase, provider: str, device: torch.device, steps: int = 10,
                    warmup: int = 3) -> dict:
    """{ms per step (median), host_ms (GPU: median time to issue a step), tokens_per_s, peak_mem_bytes
    (the step's peak, weights and optimizer state included, above what was allocated before the model),
    saved (bytes kept for backward, by part: :func:`saved_activation_bytes`; None under compile),
    backends (:func:`backends_summary` of a warm-up step), trainable}."""
    with restored_globals(provider):
        return _time_train_step(case, provider, device, steps, warmup)


def _time_train_step(case: ModelCase, provider: str, device: torch.device, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    if device.type == "cuda":  # the providers share a process: what an earlier one left is not this one's
        # (a patched model holds reference cycles: without a collection an earlier provider's model could
        # still be allocated here, and be freed by a collection in the middle of this one's steps)
        gc.collect()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
    model = build_model(case, device)
    prepare(model, provider, case.tuning)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    batch = make_batch(case, device)
    compiled = provider in COMPILED
    if compiled:
        torch._dynamo.reset()  # each case compiles afresh, with no earlier case's graphs or recompile counts
    run = torch.compile(model, backend=COMPILE_BACKEND) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        run(**batch).loss.backward()
        opt.step()

    for i in range(warmup):  # the first one compiles; the last one counts which backend ran each op
        with backends_used() if i == warmup - 1 else contextlib.nullcontext() as used:
            step()
    opt.zero_grad(set_to_none=True)
    saved = None if compiled else saved_activation_bytes(model, lambda: model(**batch).loss)
    opt.zero_grad(set_to_none=True)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        host = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            step()
            end.record()
            host.append((time.perf_counter() - t0) * 1e3)
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = int(torch.cuda.max_memory_allocated(device)) - base
        host_ms = statistics.median(host)
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = host_ms = None
    ms = statistics.median(times)  # with an even count, the mean of the middle two (not the slower one)
    out = {"ms": ms, "host_ms": host_ms, "tokens_per_s": case.M / (ms * 1e-3), "peak_mem_bytes": peak,
           "saved": saved, "backends": backends_summary(used or {}),
           "trainable": sum(p.numel() for p in params)}
    del model, opt, batch, run, step, params
    gc.collect()  # the patched model's reference cycles: free it now, not during the next provider's steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out
