"""Activation memory of the LLaVA-shaped training step at LLaVA-1.5-7B widths, counted on CPU.

    python benchmarks/activation_memory.py [--out DIR] [--tunings layernorm,mma]

Bytes autograd keeps for backward (``mmfast.bench.model.saved_activation_bytes``: what backward reads) are
a property of the model and its kernels, not of the device: this builds the model bench's case for one
sample, with one LLaMA layer and two CLIP layers at full widths (LLaVA reads the second-to-last CLIP layer's
output, so one read layer and the unread last one, which backward never reaches), counts what each part
saves under each provider, and scales that to the GPU model bench's step: per LLaMA layer times its
llm_layers, per read CLIP layer times 23 (of CLIP-L's 24), the rest (embeddings, projector, final norm, LM
head, loss) once, all per sample times the batch. The measured sample has the step's own tokens (576 image
tokens, ``--text-tokens`` text tokens), so nothing is extrapolated across token counts (the projector's
bytes go with the image tokens, the fused loss's with the labelled ones). Byte counts only; no timing here
says anything about a GPU. Writes activation_memory.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re

import torch

from mmfast.bench import model as mb
from mmfast.bench.env import environment
from mmfast.ops.loss import keeps_logit_gradients


def _where(name: str, module) -> str:
    """tower/part: 'llm/norms' (a LLaMA layer's), 'vision/mlp' (a CLIP encoder layer's), 'head/other'
    (everything else: embeddings, the projector, the final norm, the LM head, the loss), ..."""
    tower = "vision" if re.search(r"vision_tower\..*encoder\.layers\.", name) else \
        "llm" if re.search(r"language_model\.layers\.", name) else "head"
    return f"{tower}/{mb.model_part(name, module)}"


def measure(tuning: str, provider: str, text_tokens: int) -> dict:
    """Bytes saved for one sample, by tower/part (one LLaMA layer, one read CLIP layer)."""
    case = dataclasses.replace(mb.llava_7b_widths(tuning, 1, batch=1, text_tokens=text_tokens), vision_layers=2)
    torch.manual_seed(0)
    model = mb.build_model(case, torch.device("cpu"))
    assert model.config.vision_feature_layer == -2  # (layer 0 read, layer 1 not: its saves go unread)
    mb.prepare(model, provider, tuning)
    batch = mb.make_batch(case, torch.device("cpu"))
    saved = mb.saved_activation_bytes(model, lambda: model(**batch).loss, part=_where)
    return dict(case=case, saved={k: v for k, v in saved.items() if v and k != "total"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--tunings", default="layernorm,mma")
    p.add_argument("--text-tokens", type=int, default=448,
                   help="text tokens per sample (besides the 576 image tokens), measured and scaled to")
    p.add_argument("--llm-layers", type=int, default=8, help="LLaMA layers of the step scaled to")
    p.add_argument("--batch", type=int, default=mb.LLAVA_BATCH, help="samples of the step scaled to")
    args = p.parse_args()
    unknown = set(args.tunings.split(",")) - set(mb.TUNINGS)
    if unknown:
        p.error(f"--tunings: unknown {sorted(unknown)}; choose from {', '.join(mb.TUNINGS)}")
    for name in ("text_tokens", "llm_layers", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    os.makedirs(args.out, exist_ok=True)
    target = mb.llava_7b_widths("layernorm", args.llm_layers, batch=args.batch, text_tokens=args.text_tokens)
    # the fused loss keeps a trained head's gradient as the labelled rows' logit gradient ([n, V + H], bf16)
    # or as an fp32 [V, H] accumulator, whichever is smaller, for the step's rows: scaling one sample's bytes
    # holds while the step stays on the sample's side of that line
    keeps = functools.partial(keeps_logit_gradients, vocab=target.vocab, hidden=target.hidden, itemsize=2)
    if keeps(args.text_tokens) and not keeps(target.batch * args.text_tokens):
        print(f"note: the step's {target.batch * args.text_tokens} labelled rows keep a trained LM head's gradient "
              "in an fp32 [V, H] accumulator, where one sample keeps logit gradients: the fused loss's "
              "head/other bytes below are scaled from the sample's, and overstate the step's", flush=True)
    read_layers = target.vision_layers - 1  # (vision_feature_layer -2: the last layer's output is dropped)
    rows, lines = [], []
    for tuning in args.tunings.split(","):
        per = {}
        for prov in ("hf-eager", "mmfast"):
            res = measure(tuning, prov, args.text_tokens)
            case = res["case"]
            tokens = {"llm": case.M, "vision": case.image_tokens + 1, "head": case.M}  # (per sample)
            per_token = {k: v / tokens[k.split("/")[0]] for k, v in res["saved"].items()}
            times = {"llm": target.llm_layers, "vision": read_layers, "head": 1}
            step = target.batch * sum(v * times[k.split("/")[0]] for k, v in res["saved"].items())
            per[prov] = dict(per_token=per_token, step_bytes=step)
            rows.append(dict(tuning=tuning, provider=prov, per_token_bytes=per_token, step_bytes=step))
            print(f"{tuning:10s} {prov:8s} step {step / 2**30:6.2f} GiB  " +
                  "  ".join(f"{k} {v / 1024:.1f}" for k, v in sorted(per_token.items())) + "  (KiB/token)", flush=True)
        keys = sorted(set(per["hf-eager"]["per_token"]) | set(per["mmfast"]["per_token"]))
        lines += [f"## {tuning}", "", "| part | hf-eager KiB/token | mmfast KiB/token |", "|---|---|---|"]
        lines += [f"| {k} | {per['hf-eager']['per_token'].get(k, 0) / 1024:.1f} | "
                  f"{per['mmfast']['per_token'].get(k, 0) / 1024:.1f} |" for k in keys]
        hf, mm = per["hf-eager"]["step_bytes"], per["mmfast"]["step_bytes"]
        lines += ["", f"Scaled to the GPU model bench's step ({target.llm_layers} LLaMA layers, "
                  f"{read_layers} read CLIP layers, {target.batch} samples of {target.M // target.batch} tokens): "
                  f"hf-eager {hf / 2**30:.2f} GiB, "
                  f"mmfast {mm / 2**30:.2f} GiB saved for backward ({(hf - mm) / 2**30:.2f} GiB less).", ""]
    env = environment(torch.device("cpu"))
    with open(os.path.join(args.out, "activation_memory.json"), "w") as f:
        json.dump(dict(env, target=dataclasses.asdict(target) | {"dtype": str(target.dtype)}, rows=rows), f,
                  indent=1, default=str)
    head = ["# Activation memory at LLaVA-1.5-7B widths (bytes kept for backward; counted on CPU)", "",
            f"- torch {env['torch']}, transformers {env.get('transformers')}, commit {env['commit']}",
            f"- one sample of {target.M // target.batch} tokens ({target.image_tokens} image tokens, "
            f"{args.text_tokens} text tokens); counted: what backward reads",
            "- llm/*: per LLaMA layer per token; vision/*: per read CLIP encoder layer per image token (CLS "
            "included); head/*: the rest, once, per token (embeddings, projector, final norm, LM head, loss)", ""]
    with open(os.path.join(args.out, "activation_memory.md"), "w") as f:
        f.write("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
