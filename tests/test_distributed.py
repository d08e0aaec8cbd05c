"""DDP and FSDP2 (``fully_shard``) with two CPU processes (gloo): the gradients of the trainable norms
equal those of one process on the whole batch (accuracy rule of tests/accuracy.py, float64 oracle)."""

import contextlib
import copy
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import mmfast
from accuracy import assert_accurate
from model_accuracy import float64_norms
from tiny_models import FSDP1_CASES, batch, build

WORLD = 2


def _start(fn, args):
    """Both ranks, forked from one server process per test worker that imported torch, transformers and
    mmfast once (about 5 s a rank under spawn, the larger part of a case's time)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "transformers", "mmfast", "tiny_models", "dist_worker"])
    return mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="forkserver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    # (a text-only batch leaves the vision side without gradients)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("mode,tuning,dtype", [("ddp", "layernorm-simp", "float32"), ("fsdp2", "layernorm-simp", "float32"),
                                               ("fsdp2", "layernorm", "float32"), ("fsdp2", "layernorm", "bfloat16"),
                                               ("ddp", "mma", "float32"), ("ddp-reentrant", "mma", "float32"),
                                               ("ddp-mixed", "mma", "float32"),
                                               ("fsdp2", "mma", "float32"), ("fsdp2", "mma", "bfloat16"),
                                               ("fsdp2-ckpt", "mma", "bfloat16"), ("fsdp2-wrapper", "mma", "float32"),
                                               ("fsdp2", "mma-neck", "bfloat16"),
                                               ("zero0", "layernorm-simp", "bfloat16"),
                                               ("zero2", "layernorm", "float32"), ("zero2", "mma", "bfloat16"),
                                               ("zero3", "layernorm", "float32"),
                                               ("zero3", "mma", "float32"), ("zero3-init", "mma-neck", "float32"),
                                               ("zero3-init", "layernorm", "bfloat16")])
def test_distributed_gradients_match_single_process(mode, tuning, dtype, tmp_path):
    """``layernorm`` trains the LM head too: its gradient comes from the fused LM-head loss, computed
    inside the sharded root's forward, and with the final norm (``final_norm=True``). ``mma`` under DDP:
    every parameter it trains gets a gradient in every step (DDP stops at the second step otherwise); its
    float64 oracle runs the eager adapters. FSDP2 follows the README's recipe for trainable parameters of
    two dtypes (bf16: fp32 norms beside the bf16 projector, embeddings and LM head); ``fsdp2-ckpt`` adds
    HF's activation checkpointing, which recomputes the blocks inside backward; ``fsdp2-wrapper`` shards
    checkpoint wrappers around the blocks (Accelerate's order), whose hooks the modality pass stepped over
    (it read unsharded DTensor weights). DeepSpeed without ZeRO keeps
    its fp32 masters in a 16-bit optimizer of its own (loaded through its refresh). ZeRO-2 partitions
    the gradients and optimizer state (a bf16 run casts the model, fp32 masters included). ZeRO-3 (its CPU
    accelerator) partitions every module's parameters and gathers them in hooks around each module's
    forward and backward: the fused loss and the modality pass must go through those; ``zero3-init`` builds
    the model already partitioned (``zero.Init``, as ``from_pretrained`` under a ZeRO-3 config) before
    patching. Every rank checks that no backward reads a saved tensor whose storage FSDP2 has freed
    (``dist_worker._live``): ``mma`` once read the last layer's freed norm weight, which gave wrong
    gradients only in some runs."""
    if mode.startswith(("zero0", "zero2", "zero3")):
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (a dev extra; CI installs it)")
    import dist_worker

    out = tmp_path / "grads.pt"
    ctx = _start(dist_worker.run, (WORLD, _free_port(), mode, str(out), tuning, dtype))
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{mode} run did not finish in 300 s")
    dist_grads = torch.load(out)

    model = build("llava", seed=0, dtype=getattr(torch, dtype))
    opts = dict(final_norm=tuning == "layernorm")
    if tuning.startswith("mma"):
        mmfast.patch(model, tuning="mma", mma=mmfast.MMAOptions(dropout=0.0, neck=tuning == "mma-neck"), verbose=False)
        ref_model = copy.deepcopy(model).double()
        for m in ref_model.modules():
            if isinstance(m, mmfast.MMAdapter):
                m.impl = "eager"
    else:
        ref_model = copy.deepcopy(model).double()
        mmfast.patch(model, tuning=tuning, verbose=False, **opts)
        mmfast.patch(ref_model, tuning=tuning, master_weights=False, verbose=False, **opts)
    if mode == "ddp-mixed":  # each rank's batch, twice (two micro-batches), the ranks' gradients averaged
        parts = [dist_worker.mixed_rank_batch(r, getattr(torch, dtype)) for r in range(WORLD)]
    else:
        parts = [batch("llava", seed=7, B=2 * WORLD, dtype=getattr(torch, dtype))]
    single, ref = {}, {}
    for inputs in parts:
        weight = 2 / WORLD if mode == "ddp-mixed" else 1
        for into, m, x in ((single, model, inputs),
                           (ref, ref_model, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})):
            # (the oracle: HF's forwards, its RMSNorms in float64 too; float64_norms leaves other dtypes alone)
            with mmfast.disabled() if m is ref_model else contextlib.nullcontext(), float64_norms(m):
                for n, g in _single_process_grads(m, x).items():
                    into[n] = into.get(n, 0) + weight * g

    assert dist_grads.keys() == single.keys() == ref.keys()
    # save_trainable, called on every rank: rank 0 wrote the whole (gathered) trainable state
    from safetensors.torch import load_file

    assert [(tmp_path / f"grads.pt.rank{r}.writes").read_text() for r in range(WORLD)] == ["1"] + ["0"] * (WORLD - 1)
    saved, params = load_file(str(out) + ".safetensors"), dict(model.named_parameters())
    assert saved.keys() == single.keys()
    # (ZeRO-3 partitions keep the model's dtype: mmfast's fp32 master weights are DeepSpeed's optimizer's there;
    # a bf16 ZeRO-2 engine casts the model, and its optimizer's masters start from that rounding)
    rounded = torch.bfloat16 if mode in ("zero0", "zero2") and dtype == "bfloat16" else None
    assert all(torch.equal(saved[n].to(params[n].dtype), params[n].detach().to(rounded or params[n].dtype)
                           .to(params[n].dtype)) for n in saved)
    if tuning == "layernorm-simp":
        assert len(single) == 2 * 2
    elif tuning == "layernorm":
        assert any("lm_head" in n for n in single)
    else:
        assert {n for n in single if "mma" in n} == {n for n, _ in model.named_parameters() if "mma" in n}
        assert any("mma_neck" in n for n in single) == (tuning == "mma-neck")
    for name in single:
        # the one-process run is the low-precision baseline the distributed run is held to
        assert_accurate(f"{mode} grad {name}", dist_grads[name], single[name], ref[name],
                        ref[name].abs().max().item(), seed=0)


@pytest.mark.parametrize("case", FSDP1_CASES)
def test_save_trainable_gathers_fsdp1_shards(tmp_path, case):
    """FSDP1 (Accelerate's default FSDP) keeps each rank's slice of flat parameters under wrapper names:
    save_trainable wrote those slices (some of shape (0,)) named ``..._fsdp_wrapped_module...``. It gathers
    them now, one unit at a time, names them as the unwrapped model does (so the file loads into it), saves
    a tied parameter once, and leaves a model saved before its first forward able to run it."""
    import dist_worker
    from tiny_models import build_fsdp1_case

    out = tmp_path / "fsdp1.safetensors"
    ctx = _start(dist_worker.save_fsdp1, (WORLD, _free_port(), str(out), case))
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("fsdp1 run did not finish in 300 s")
    from safetensors.torch import load_file

    model = build_fsdp1_case(case)
    want = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    saved = load_file(str(out))
    assert saved.keys() == want.keys()
    for n in want:
        assert torch.equal(saved[n], want[n]), n
    fresh = build_fsdp1_case(case)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()
    mmfast.load_trainable(fresh, out)
    assert all(torch.equal(p.detach(), want[n]) for n, p in fresh.named_parameters() if p.requires_grad)
