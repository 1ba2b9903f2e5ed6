"""Fine-tune retrofitted models from YAML recipes: ``se-retrofit finetune RECIPE --data DIR``.

A recipe (see ``recipes/``) names the model, the attention to retrofit (type, position, r, stages)
and a schedule of phases: first the new attention modules and the head alone
(:func:`se_retrofit.freeze_backbone` with ``train_head=True``), then the whole network at a lower
rate (:func:`se_retrofit.unfreeze` and :func:`se_retrofit.param_groups` with ``new_lr_scale``).

Example:
    >>> from se_retrofit import finetune
    >>> recipe = finetune.load_recipe("recipes/resnet50-se-standard.yaml")  # doctest: +SKIP
    >>> [(p.name, p.trainable) for p in recipe.phases]  # doctest: +SKIP
    [('new-modules', 'new'), ('full', 'all')]
    >>> result = finetune.run(recipe, "images/", out="runs/se", image_size=128)  # doctest: +SKIP
"""
from .checkpoint import CheckpointError
from .data import DataError, find_splits
from .distributed import DeviceError
from .plot import plot_curves, read_csv, write_csv
from .recipe import DataSpec, Phase, Recipe, RecipeError, TrainSpec, load_recipe
from .trainer import FinetuneError, Options, Result, export, plan_run, run, set_num_classes

__all__ = ["CheckpointError", "DataError", "DataSpec", "DeviceError", "FinetuneError", "Options", "Phase",
           "Recipe", "RecipeError", "Result", "TrainSpec", "export", "find_splits", "load_recipe", "plot_curves",
           "plan_run", "read_csv", "run", "set_num_classes", "write_csv"]
