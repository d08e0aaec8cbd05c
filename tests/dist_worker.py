"""Worker for the distributed tests: one rank of a DDP or FSDP2 run on CPU (gloo), two training steps'
backward passes, saving the second one's gradients of the trainable parameters (gathered to full
tensors) from rank 0. ``tuning="mma"`` (and ``"mma-neck"``, with the visual neck) runs without dropout, so that runs compare."""

import importlib
import os
import sys


def _live(t):
    """Unpack hook: a tensor saved for backward must still own its storage when the backward reads it.
    FSDP2 frees a block's gathered parameters between its forward and its backward (and again after
    its backward); a backward that runs outside the block's own backward hooks reads freed memory,
    which gives wrong gradients only now and then. This makes it fail every time."""
    need = (t.storage_offset() + max(((s - 1) * st for s, st in zip(t.shape, t.stride())), default=0) + 1) * t.element_size()
    if t.numel() and t.untyped_storage().nbytes() < need:
        raise RuntimeError(f"backward read a saved tensor {tuple(t.shape)} {t.dtype} whose storage was freed "
                           f"({t.untyped_storage().nbytes()} of {need} bytes)")
    return t


def mixed_rank_batch(rank: int, dtype):
    """``ddp-mixed``: rank 0's batch holds images, the other ranks' only text."""
    from tiny_models import batch

    return batch("llava", seed=7 + rank, B=2, dtype=dtype, images=[rank == 0] * 2)


def run(rank: int, world: int, port: int, mode: str, out_path: str, tuning: str = "layernorm-simp",
        dtype: str = "float32") -> None:
    import faulthandler

    faulthandler.dump_traceback_later(240, exit=True)  # a hung rank says where, then exits
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    import torch.distributed as dist

    import mmfast
    from tiny_models import batch, build

    deepspeed_mode = mode.startswith(("zero0", "zero2", "zero3"))
    if deepspeed_mode:  # DeepSpeed reads the launcher's variables and picks its CPU accelerator
        os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # DeepSpeed's CPU communication speed-up (a shared-memory allreduce) is a C++ op it compiles on first
        # use: about a minute of CI per run for no part of what is tested here. Its collectives then go
        # through the gloo group below (on a GPU, NCCL carries them, and this op is never built).
        # (import_module: "import deepspeed.comm.torch as m" binds the torch package deepspeed.comm imported)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": {"zero0": 0, "zero2": 2}.get(mode, 3)},
                  "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True,
                  "bf16": {"enabled": dtype == "bfloat16"}}
        if mode == "zero3-init":  # built partitioned, as from_pretrained does under a ZeRO-3 config
            import deepspeed

            from transformers import LlavaForConditionalGeneration

            from tiny_models import llava_config

            # the partitions' dtype comes from the config's bf16 switch (an explicit dtype= is not honoured
            # on DeepSpeed's CPU accelerator: it takes bf16 whatever is asked)
            with deepspeed.zero.Init(config_dict_or_path=config):
                model = LlavaForConditionalGeneration(llava_config())
            state = build("llava", seed=0, dtype=getattr(torch, dtype)).state_dict()  # the other runs' weights
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0), torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(state[name])
        else:
            model = build("llava", seed=0, dtype=getattr(torch, dtype))
        if tuning.startswith("mma"):  # "mma-neck": with the visual neck in the projector's place
            opts = dict(mma=mmfast.MMAOptions(dropout=0.0, neck=tuning == "mma-neck"))
        else:
            opts = dict(final_norm=tuning == "layernorm")
        mmfast.patch(model, tuning=tuning.removesuffix("-neck"), verbose=False, **opts)  # before wrapping, as documented
        if mode == "zero3-init":  # partitioned parameters keep their dtype: ZeRO-3 holds them (ds_tensor)
            assert all(p.dtype == p.ds_tensor.dtype for p in model.parameters() if hasattr(p, "ds_tensor"))
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        elif mode == "ddp-reentrant":  # the README's recipe for reentrant checkpointing
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.train()
            model = torch.nn.parallel.DistributedDataParallel(model, static_graph=True)
        elif mode == "ddp-mixed":  # the README's recipe where a rank's batch may hold only text, with accumulation
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        elif mode in ("fsdp2", "fsdp2-ckpt", "fsdp2-wrapper"):
            if mode == "fsdp2-ckpt":  # HF's activation checkpointing (non-reentrant by default)
                model.gradient_checkpointing_enable()
                model.train()
            if mode == "fsdp2-wrapper":  # Accelerate's order: checkpoint wrappers, then FSDP2 shards them
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                    apply_activation_checkpointing, checkpoint_wrapper)

                blocks = set(model.model.language_model.layers)
                apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                               check_fn=lambda m: m in blocks)
                model.train()
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # the model is on CPU: without an explicit CPU mesh, fully_shard meshes over CUDA whenever a
            # GPU is visible, and a CPU model on a CUDA mesh crashes the rank
            mesh = init_device_mesh("cpu", (world,))
            lm = model.model.language_model
            # the README's recipe: the blocks, then the fp32 trainables outside the LLM blocks in groups
            # of their own (FSDP2 wants one dtype among a group's trainable parameters), then the root
            for layer in [*lm.layers, *model.model.vision_tower.encoder.layers]:
                fully_shard(layer, mesh=mesh)
            for m in [getattr(lm, "mma_modality_embedding", None), lm.norm if tuning == "layernorm" else None,
                      model.model.multi_modal_projector if tuning == "mma-neck" else None]:
                if m is not None:
                    fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
        elif deepspeed_mode:  # DeepSpeed ZeRO-2 / ZeRO-3 (its CPU accelerator, over the gloo group above)
            import deepspeed

            model, *_ = deepspeed.initialize(model=model, config=config,
                                             model_parameters=[p for p in model.parameters() if p.requires_grad])
        else:
            raise ValueError(mode)
        if mode == "ddp-mixed":
            mine = mixed_rank_batch(rank, getattr(torch, dtype))
        else:
            full = batch("llava", seed=7, B=2 * world, dtype=getattr(torch, dtype))
            per = full["input_ids"].shape[0] // world
            mine = {k: v[rank * per:(rank + 1) * per] for k, v in full.items()}
        grads = {}
        # DDP finds a parameter that got no gradient only at the second step; a DeepSpeed engine's
        # gradients are read after one (its next backward would start a new accumulation)
        for _ in range(1 if deepspeed_mode else 2):
            if not deepspeed_mode:
                model.zero_grad(set_to_none=True)
            if mode == "ddp-mixed":  # two micro-batches (the same one twice), the first without the all-reduce
                with model.no_sync():
                    model(**mine).loss.backward()
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _live):
                loss = model(**mine).loss
            model.backward(loss) if deepspeed_mode else loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                if deepspeed_mode:
                    from deepspeed.utils import safe_get_full_grad

                    g = safe_get_full_grad(p)
                else:
                    g = p.grad
                name = name.removeprefix("module.").replace("_checkpoint_wrapped_module.", "")
                grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
        if rank == 0:
            torch.save(grads, out_path)
        # save_trainable on every rank, as documented: it gathers, and rank 0 alone writes
        from safetensors import torch as st

        writes, real_save = [], st.save_file
        st.save_file = lambda *a, **k: writes.append(1) or real_save(*a, **k)
        try:
            mmfast.save_trainable(model, out_path + ".safetensors")
        finally:
            st.save_file = real_save
        with open(f"{out_path}.rank{rank}.writes", "w") as f:
            f.write(str(len(writes)))
        if deepspeed_mode:  # loaded back on every rank: into the module's copies and the optimizer's masters
            from deepspeed.utils import safe_get_full_fp32_param
            from safetensors import torch as st

            from mmfast.tuning.state import FORMAT

            if rank == 0:
                first = st.load_file(out_path + ".safetensors")
                # the optimizer's fp32 masters were saved, not a bf16 engine's module copies (their rounding)
                assert mode == "zero0" or all(t.dtype == torch.float32 for t in first.values()), \
                    {n: t.dtype for n, t in first.items()}
                moved = {n: t + 0.5 for n, t in first.items()}
                st.save_file(moved, out_path + ".moved.safetensors", metadata={"format": FORMAT})
            dist.barrier()
            moved = st.load_file(out_path + ".moved.safetensors")
            mmfast.load_trainable(model, out_path + ".moved.safetensors")
            if mode == "zero0":  # DeepSpeed's 16-bit optimizer without ZeRO: no per-parameter masters to ask;
                model.step()  # its masters come from the loaded module copies, so a step (lr 0) keeps them
                assert all(torch.equal(p.detach(), moved[n].to(p.dtype)) for n, p in model.module.named_parameters()
                           if p.requires_grad)
            for name, p in model.module.named_parameters():
                if p.requires_grad and mode != "zero0":
                    master = safe_get_full_fp32_param(p)
                    assert torch.equal(master.cpu(), moved[name].float()), name
                    from deepspeed import zero

                    with zero.GatheredParameters([p]):
                        assert torch.equal(p.detach().cpu(), moved[name].to(p.dtype)), name
            if mode.startswith("zero3"):  # a rank that cannot load says so before the others wait in a gather
                try:
                    mmfast.load_trainable(model, out_path + (".moved" if rank == 0 else ".absent") + ".safetensors")
                except RuntimeError as e:
                    assert rank == 0 and "another rank could not load" in str(e), (rank, e)
                except Exception as e:  # noqa: BLE001 - the missing file's own error
                    assert rank == 1 and "absent" in str(e), (rank, e)
                else:
                    raise AssertionError(f"rank {rank} loaded")
                real_save = st.save_file  # and a rank 0 that cannot write says so to the others (not a hang)

                def full_disk(*a, **k):
                    raise OSError(28, "No space left on device")

                st.save_file = full_disk
                try:
                    mmfast.save_trainable(model, out_path + ".full.safetensors")
                except OSError:
                    assert rank == 0
                except RuntimeError as e:
                    assert rank == 1 and "rank 0 could not write" in str(e), (rank, e)
                else:
                    raise AssertionError(f"rank {rank} saved")
                finally:
                    st.save_file = real_save
            # and saved again from the masters (a bf16 run's module copies are their rounding)
            mmfast.save_trainable(model, out_path + ".resaved.safetensors")
            if rank == 0 and mode != "zero0":
                resaved = st.load_file(out_path + ".resaved.safetensors")
                assert resaved.keys() == moved.keys()
                assert all(torch.equal(resaved[n], moved[n].float()) for n in moved), \
                    [n for n in moved if not torch.equal(resaved[n], moved[n].float())]
        # release the DDP reducer / FSDP state while the group is alive, then leave together
        del model, grads
        import gc

        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def save_fsdp1(rank: int, world: int, port: int, out_path: str, case: str = "wrapped") -> None:
    """One rank of an FSDP1 (``FullyShardedDataParallel``, decoder layers auto-wrapped) run of a tuned
    LLaVA, then ``save_trainable`` on every rank. ``case``: "wrapped" (activation checkpointing wrappers
    inside, as Accelerate's FSDP plugin sets it up; ``layernorm``), "tied" (tied embeddings, trained:
    ``layernorm``), "before-forward" (``layernorm-simp``, nothing trainable in the root unit, saved before
    the first forward, which must run after it), "flat-params" (``use_orig_params=False``, every norm a unit:
    each summon makes new parameter objects, which may take the ids of an earlier unit's freed ones)."""
    import functools

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    import torch.distributed as dist

    import mmfast
    from tiny_models import FSDP1_CASES, batch, build_fsdp1_case

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                                   checkpoint_wrapper)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        assert case in FSDP1_CASES
        model = build_fsdp1_case(case)
        policy = ModuleWrapPolicy({LlamaDecoderLayer})
        if case == "flat-params":
            # a flat parameter without use_orig_params must be all trainable or all frozen: every module with
            # trainable parameters of its own is a unit (PEFT's FSDP policy does the same for adapters), so
            # there are many summons, each making new parameter objects
            def unit(module, recurse, nonwrapped_numel):
                own = list(module.parameters(recurse=False))
                return recurse or isinstance(module, LlamaDecoderLayer) or bool(own) and all(p.requires_grad for p in own)

            policy = unit
        model = FSDP(model, use_orig_params=case != "flat-params", device_id=torch.device("cpu"),
                     auto_wrap_policy=policy)
        if case == "wrapped":
            apply_activation_checkpointing(model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper),
                                           check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
        if case != "before-forward":
            model(**batch("llava", seed=rank)).loss.backward()
        mmfast.save_trainable(model, out_path)
        if case == "before-forward":
            model(**batch("llava", seed=rank)).loss.backward()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # the rank is done: leave without the interpreter's teardown, where gloo's threads, left to C++ static
    # destructors, aborted a rank now and then ("terminate called without an active exception", about one
    # run in fifteen, also before this test's code changed)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
