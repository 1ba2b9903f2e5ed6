"""Hugging Face transformers base models: record the model class and its config, rebuild from them.

:func:`se_retrofit.retrofit` of a transformers ``PreTrainedModel`` records, in the saved
``retrofit_config.json``, the source ``transformers``, the class name (``ResNetForImageClassification``)
and the model's full config; :func:`se_retrofit.load` then re-creates the base on its own with
``getattr(transformers, name)(config_class.from_dict(config))`` and loads the saved weights.

Loading runs no code it was not asked to: the name is looked up only as an attribute of the top-level
``transformers`` package and must be a ``PreTrainedModel`` subclass (no module named by the file is
imported, there is no ``trust_remote_code``); anything else asks for ``base_model=``.

``save_pretrained`` of an *edited* model followed by ``from_pretrained`` builds the plain class and
drops the attention (transformers lists its weights as UNEXPECTED): an edited model's
``save_pretrained`` therefore warns (:class:`SavePretrainedWarning`) before saving. Save with
:func:`se_retrofit.save`, or keep the base in transformers' format and the attention as se_retrofit's
adapter (docs/python-api.md, "Hugging Face transformers models").
"""
from __future__ import annotations

import json
import sys
import warnings
from typing import Any

from torch import nn

from .errors import RetrofitError

SOURCE = "transformers"


class TransformersBaseError(RetrofitError):
    """The recorded transformers base cannot be rebuilt safely; pass ``base_model=``."""


class SavePretrainedWarning(UserWarning):
    """``from_pretrained`` of what an edited model's ``save_pretrained`` writes drops the attention."""


SAVE_PRETRAINED_MESSAGE = (
    "save_pretrained of a model edited by se_retrofit writes weights that from_pretrained loads into the "
    "plain {cls} WITHOUT the attention (transformers drops its weights as unexpected); save it with "
    "se_retrofit.save(model, dir) and load it with se_retrofit.load(dir), or save the base with save_pretrained "
    "and load the attention adapter onto it: se_retrofit.load(dir, base_model=..., weights='attention')")


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (transformers is not imported for this)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


class _WarnOnSavePretrained:
    """Stands for ``save_pretrained`` on an edited transformers model: warns, then saves as transformers
    does. Kept in the instance's ``__dict__``; copies and pickles carry it, bound to the copy."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        warnings.warn(SAVE_PRETRAINED_MESSAGE.format(cls=type(self.model).__name__), SavePretrainedWarning,
                      stacklevel=2)
        return type(self.model).save_pretrained(self.model, *args, **kwargs)


def warn_on_save_pretrained(model: nn.Module) -> None:
    """Make an edited transformers model's ``save_pretrained`` warn that ``from_pretrained`` of its
    output drops the attention (no-op for other models)."""
    if is_transformers_model(model) and hasattr(type(model), "save_pretrained"):
        model.__dict__["save_pretrained"] = _WarnOnSavePretrained(model)


def describe(model: nn.Module) -> dict[str, Any]:
    """The ``base`` entries that let :func:`rebuild` re-create ``model``'s architecture (empty when
    its class is not one of the ``transformers`` package's own, e.g. remote code or a subclass).

    Example:
        >>> from transformers import ResNetConfig, ResNetModel
        >>> from se_retrofit.hf import describe
        >>> info = describe(ResNetModel(ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1])))
        >>> info["source"], info["name"], info["config"]["hidden_sizes"]
        ('transformers', 'ResNetModel', [8, 16])
    """
    import transformers

    name = type(model).__name__
    if getattr(transformers, name, None) is not type(model):
        return {}
    config = json.loads(model.config.to_json_string(use_diff=False))
    info = {"source": SOURCE, "name": name, "config": config, "transformers_version": transformers.__version__}
    if config.get("_name_or_path"):
        info["weights"] = f"as passed to se_retrofit.retrofit() (transformers from {config['_name_or_path']!r})"
    return info


def model_class(name: Any) -> type:
    """The ``transformers`` class called ``name``; a :class:`TransformersBaseError` for anything that
    is not a public ``PreTrainedModel`` subclass of the top-level package (nothing is imported by name).

    Example:
        >>> from se_retrofit.hf import model_class
        >>> model_class("ResNetForImageClassification").__name__
        'ResNetForImageClassification'
        >>> model_class("os.system")
        Traceback (most recent call last):
        ...
        se_retrofit.hf.TransformersBaseError: the base model class 'os.system' is not a model class of the transformers package; pass base_model= to load onto your own model
    """
    import transformers

    refuse = TransformersBaseError(f"the base model class {name!r} is not a model class of the transformers "
                                   "package; pass base_model= to load onto your own model")
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise refuse
    try:
        cls = getattr(transformers, name)
    except Exception:  # unknown name, or a lazy attribute whose optional backend is missing
        raise refuse from None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise refuse
    return cls


def rebuild(base: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of the recorded class and config (weights are loaded afterwards).

    Example:
        >>> import torch
        >>> from transformers import ResNetConfig, ResNetModel
        >>> from se_retrofit.hf import describe, rebuild
        >>> model = rebuild(describe(ResNetModel(ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1]))))
        >>> type(model).__name__, model.config.hidden_sizes
        ('ResNetModel', [8, 16])
    """
    cls = model_class(base.get("name"))
    config = base.get("config")
    if not isinstance(config, dict):
        raise TransformersBaseError(f"the recorded config of the transformers base {base.get('name')} is missing "
                                    "or not a JSON object; pass base_model= to load onto your own model")
    config = dict(config)
    if "use_pretrained_backbone" in config:  # the saved weights replace them: never download a backbone
        config["use_pretrained_backbone"] = False
    try:
        return cls(cls.config_class.from_dict(config))
    except Exception as error:
        raise TransformersBaseError(f"cannot rebuild {cls.__name__} from the recorded config "
                                    f"({type(error).__name__}: {error}); pass base_model=") from None
