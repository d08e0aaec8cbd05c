"""HF Trainer callback: what a tuning recipe trains, saved beside each Trainer checkpoint.

A Trainer checkpoint does not always hold what ``mmfast.patch``'s recipe trains: a PEFT model's holds PEFT's
adapters only, and with transformers 5.25 a LLaVA checkpoint's weights are not loaded back (its keys are
written under the original checkpoint's names and read unmapped). So a resume started the recipe's norms,
projector and MMA adapters from the base model, and ``load_best_model_at_end`` restored the best step's LoRA
weights beside the last step's norms. :class:`SaveTrainable` writes :func:`mmfast.save_trainable`'s file
into every checkpoint, and at the end of training, where Trainer loaded the best checkpoint, loads its file.
"""

from __future__ import annotations

import os
import warnings

from transformers import TrainerCallback

from .state import load_trainable, save_trainable

#: The file in each checkpoint directory
FILE_NAME = "mmfast.safetensors"


class SaveTrainable(TrainerCallback):
    """``Trainer(..., callbacks=[mmfast.SaveTrainable()])``: each checkpoint gets ``mmfast.safetensors``
    (the model's trainable tensors; every rank takes part, as :func:`mmfast.save_trainable` needs), and with
    ``load_best_model_at_end`` the best checkpoint's file is loaded after Trainer loaded its own weights. To
    resume, load the checkpoint's file before ``trainer.train(resume_from_checkpoint=...)``:
    ``mmfast.load_trainable(model, f"{checkpoint}/mmfast.safetensors")``."""

    def on_save(self, args, state, control, model=None, **kwargs):
        save_trainable(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}", FILE_NAME))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        best = state.best_model_checkpoint
        if not (args.load_best_model_at_end and best):
            return
        path = os.path.join(best, FILE_NAME)
        if not os.path.exists(path):  # (a checkpoint saved before the callback was added)
            warnings.warn(f"mmfast.SaveTrainable: Trainer loaded the best checkpoint {best}, which has no {FILE_NAME}: "
                          "what the tuning recipe trains (beyond what Trainer's checkpoint holds) keeps the last "
                          "step's values", RuntimeWarning, stacklevel=2)
            return
        load_trainable(model, path)
