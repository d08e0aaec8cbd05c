"""Tuning recipes (which parameters train) and the trainable state's save/load."""

from .recipes import LN_RECIPES, apply_ln_recipe, remove_tuning_hooks, restore_master_weights
from .state import load_trainable, save_trainable

__all__ = ["LN_RECIPES", "apply_ln_recipe", "load_trainable", "remove_tuning_hooks", "restore_master_weights",
           "save_trainable"]
