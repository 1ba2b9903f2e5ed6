"""Base models by name: timm or torchvision, with pretrained, random or local weights.

Offline machines are noticed in a few seconds (a bounded connection probe), instead of the
minute timm's hub client spends retrying, and the model then starts from random weights with one
clear warning. Every model comes back with a sentence saying where its weights came from.
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
import socket
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import RetrofitError

SOURCES = ("timm", "torchvision")
WEIGHTS_HOSTS = {"timm": "huggingface.co", "torchvision": "download.pytorch.org"}
PROBE_SECONDS = 3.0


class UnknownModelError(RetrofitError):
    """No timm or torchvision model has that name."""


class WeightsError(RetrofitError):
    """A weights file could not be read or does not fit the model."""


class OfflineWarning(UserWarning):
    """Pretrained weights could not be fetched; the model starts from random weights."""


@dataclass(frozen=True)
class ModelRef:
    """A model name resolved to its library."""

    name: str
    source: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


def resolve(name: str, source: str | None = None) -> ModelRef:
    """``resnet50`` → timm, ``torchvision:resnet50`` → torchvision; unknown names get suggestions."""
    if ":" in name and name.split(":", 1)[0] in SOURCES:
        prefix, name = name.split(":", 1)
        if source and source != prefix:
            raise UnknownModelError(f"model {prefix}:{name} contradicts --source {source}")
        source = prefix
    if source is not None and source not in SOURCES:
        raise UnknownModelError(f"unknown source {source!r}; choose timm or torchvision")
    candidates = [s for s in (source,) if s] or list(SOURCES)
    for library in candidates:
        if name in _model_names(library):
            return ModelRef(name, library)
    raise UnknownModelError(_unknown_message(name, candidates))


def _model_names(source: str) -> list[str]:
    if source == "timm":
        import timm

        return timm.list_models()
    import torchvision

    return torchvision.models.list_models()


def _unknown_message(name: str, sources: list[str]) -> str:
    pool = {}
    for source in sources:
        for known in _model_names(source):
            pool.setdefault(known, source)
    close = difflib.get_close_matches(name, list(pool), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(c if pool[c] == 'timm' else 'torchvision:' + c for c in close)}?" \
        if close else "; list them with timm.list_models() or torchvision.models.list_models()"
    return f"unknown model {name!r} in {' or '.join(sources)}{hint}"


def create(ref: ModelRef, weights: str = "pretrained", *, allow_pickle: bool = False,
           **create_kwargs) -> tuple[nn.Module, str]:
    """Build the model and say where its weights came from.

    Args:
        ref: the resolved model.
        weights: ``pretrained`` (the library's weights; random with a warning when offline),
            ``none`` (random), or the path of a state dict (``.safetensors``; a pickled
            ``.pth``/``.pt`` file only with ``allow_pickle=True``, and then read with
            ``weights_only=True``).
        allow_pickle: permit pickled torch files (never needed for ``.safetensors``).
        create_kwargs: passed to the library's constructor (``num_classes=10``).
    """
    _check_create_kwargs(create_kwargs)
    if weights == "none":
        model = _build(ref, False, create_kwargs)
        return remember_construction(model, ref, create_kwargs), "random initialisation (weights: none)"
    if weights == "pretrained":
        model, origin = _pretrained(ref, create_kwargs)
        tag = _pretrained_tag(ref, model) if origin.startswith("pretrained") else None
        return remember_construction(model, ref, create_kwargs, tag), origin
    path = Path(weights)
    model = _build(ref, False, create_kwargs)
    load_weights_file(model, path, allow_pickle=allow_pickle)
    return remember_construction(model, ref, create_kwargs), f"file {path}"


#: where :func:`create` notes how it built a model (read by ``se_retrofit.core.describe_base``)
BUILT_ATTR = "_se_retrofit_built"


def remember_construction(model: nn.Module, ref: ModelRef, create_kwargs: dict,
                          pretrained_tag: str | None = None) -> nn.Module:
    """Note on ``model`` the name, constructor keywords and pretrained tag it was built with, so that
    :func:`se_retrofit.save` records them and :func:`se_retrofit.load` builds the same model again
    (keywords that are not plain JSON values are not noted: a saved config could not hold them)."""
    if all(_json_plain(value) for value in create_kwargs.values()):
        model.__dict__[BUILT_ATTR] = {"name": ref.name, "source": ref.source, "create_kwargs": dict(create_kwargs),
                                      "pretrained_tag": pretrained_tag}
    return model


def _json_plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_json_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _pretrained_tag(ref: ModelRef, model: nn.Module) -> str | None:
    """The tag of the pretrained weights a model was built with: timm's ``pretrained_cfg['tag']``,
    torchvision's default weights enum (``ResNet50_Weights.IMAGENET1K_V2``)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        return cfg.get("tag") or None
    try:
        import torchvision

        return str(torchvision.models.get_model_weights(ref.name).DEFAULT)
    except Exception:  # a builder without registered weights has no tag
        return None


#: constructor options that make the library read or fetch weights itself, past read_state_dict's rules
WEIGHT_LOADING_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                         "weights", "weights_backbone", "pretrained_backbone")


def loading_kwargs(create_kwargs: dict) -> list[str]:
    """The options in ``create_kwargs`` that would load weights: any of :data:`WEIGHT_LOADING_KWARGS`
    with a value other than None or False (``weights_backbone: null`` turns a download off), and
    ``pretrained`` / ``weights`` always (se_retrofit sets those from ``weights``)."""
    return sorted(key for key in create_kwargs
                  if (key in WEIGHT_LOADING_KWARGS or _WEIGHT_PARAMETER.match(str(key)))
                  and (key in ("pretrained", "weights") or create_kwargs[key] not in (None, False)))


def _check_create_kwargs(create_kwargs: dict) -> None:
    """Refuse constructor options that load weights behind :func:`read_state_dict`'s back (timm's
    ``checkpoint_path`` runs ``torch.load`` on a pickle; ``pretrained_cfg_overlay=dict(file=…)``
    too), so every weight goes through one reader and the model says where its weights came from."""
    found = loading_kwargs(create_kwargs)
    if found:
        raise WeightsError(f"model option {found[0]!r} would make the library load weights itself; give the file "
                           "as the weights instead (--weights PATH, or weights: PATH in a recipe), which reads "
                           ".safetensors, and pickled .pth/.pt files only with --allow-pickle")


def _build(ref: ModelRef, pretrained: bool, create_kwargs: dict | None = None) -> nn.Module:
    kwargs = dict(create_kwargs or {})
    if not pretrained:  # "none" means no weights from anywhere: the backbone's too
        quiet = {k: v for k, v in no_weight_kwargs(_builder(ref)).items() if k not in ("pretrained", "weights")}
        kwargs = {**quiet, **kwargs}
    try:
        if ref.source == "timm":
            import timm

            return timm.create_model(ref.name, pretrained=pretrained, **kwargs)
        import torchvision

        return torchvision.models.get_model(ref.name, weights="DEFAULT" if pretrained else None, **kwargs)
    except TypeError as error:
        unknown = re.search(r"unexpected keyword argument '([^']+)'", str(error))
        if not unknown:
            raise
        raise WeightsError(f"model option {unknown.group(1)!r} is not accepted by {ref}; it accepts "
                           f"{', '.join(accepted_kwargs(ref)) or 'no options'}") from None


def _builder(ref: ModelRef) -> Callable[..., nn.Module]:
    if ref.source == "timm":
        import timm

        return timm.models.model_entrypoint(ref.name)
    import torchvision

    return torchvision.models.get_model_builder(ref.name)


_WEIGHT_PARAMETER = re.compile(r"^(weights.*|.*_weights|pretrained.*)$")


def no_weight_kwargs(builder: Callable[..., nn.Module]) -> dict[str, Any]:
    """Keyword arguments that keep ``builder`` from reading weights: every parameter named ``weights*``,
    ``*_weights`` (None) or ``pretrained*`` (False), found from its signature (torchvision's
    ``weights_backbone`` of the detectors, ``pretrained_backbone`` of older builders, …).

    Example:
        >>> import torchvision
        >>> no_weight_kwargs(torchvision.models.detection.fasterrcnn_resnet50_fpn)
        {'weights': None, 'weights_backbone': None}
    """
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: (False if p.name.startswith("pretrained") else None) for p in parameters
            if _WEIGHT_PARAMETER.match(p.name) and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def accepted_kwargs(ref: ModelRef) -> list[str]:
    """The constructor options ``ref`` accepts: its builder's and (behind ``**kwargs``) its class's."""
    names: list[str] = []
    targets: list[Any] = [_builder(ref)]
    try:
        with torch.device("meta"):
            targets.append(type(_builder(ref)(**no_weight_kwargs(_builder(ref)))).__init__)
    except Exception:  # noqa: BLE001 - only a hint for the message
        pass
    for target in targets:
        try:
            parameters = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            continue
        names += [p.name for p in parameters if p.name != "self" and p.name not in names
                  and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and not _WEIGHT_PARAMETER.match(p.name)]
    return names


def _pretrained(ref: ModelRef, create_kwargs: dict) -> tuple[nn.Module, str]:
    host = WEIGHTS_HOSTS[ref.source]
    cached = _cached_weights(ref)
    if cached is None and not reachable(host):
        model = _build(ref, False, create_kwargs)
        message = (f"offline: {host} cannot be reached and no cached weights for {ref} were found; "
                   "continuing from RANDOM weights (pass --weights PATH to use a local file)")
        warnings.warn(message, OfflineWarning, stacklevel=2)
        return model, f"random initialisation (pretrained weights unavailable offline from {host})"
    try:
        with _offline_hub(cached is not None):
            model = _build(ref, True, create_kwargs)
    except Exception as error:  # any download failure: say it once, carry on from random weights
        warnings.warn(f"pretrained weights for {ref} could not be loaded ({type(error).__name__}); "
                      "continuing from RANDOM weights", OfflineWarning, stacklevel=2)
        return _build(ref, False, create_kwargs), f"random initialisation (pretrained download failed: {error})"
    return model, f"pretrained: {_weights_tag(ref, model)}" + (" (from local cache)" if cached else "")


def reachable(host: str, port: int = 443, seconds: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to ``host`` opens within ``seconds`` (DNS included)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" and host == WEIGHTS_HOSTS["timm"]:
        return False
    outcome: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(outcome and outcome[0])


def _cached_weights(ref: ModelRef) -> Path | None:
    """The local file the library would load pretrained weights from, if already downloaded."""
    try:
        if ref.source == "torchvision":
            import torchvision

            url = torchvision.models.get_model_weights(ref.name).DEFAULT.url
            path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
            return path if path.is_file() else None
        import timm
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(ref.name)
        repo = getattr(cfg, "hf_hub_id", None)
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename) if repo else None
            if isinstance(found, str):
                return Path(found)
    except Exception:  # no cache information is the same as no cache
        return None
    return None


class _offline_hub:
    """Tell the HF hub client not to reach the network while loading from the local cache."""

    def __init__(self, active: bool):
        self.active, self.saved = active, None

    def __enter__(self):
        if self.active:
            self.saved = os.environ.get("HF_HUB_OFFLINE")
            os.environ["HF_HUB_OFFLINE"] = "1"

    def __exit__(self, *exc):
        if self.active:
            if self.saved is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = self.saved


def _weights_tag(ref: ModelRef, model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        return f"timm hub {cfg.get('hf_hub_id') or cfg.get('url') or ref.name}"
    import torchvision

    return f"torchvision {torchvision.models.get_model_weights(ref.name).DEFAULT}"


def read_state_dict(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or (only with ``allow_pickle``) a torch file read with
    ``weights_only=True``; unwrap common wrappers (``state_dict``, ``model``)."""
    path = Path(path)
    check_weights_path(path, allow_pickle=allow_pickle)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"cannot read weights file {path}: {type(error).__name__}: "
                           f"{first_sentence(error)}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return state


def check_weights_path(path: Path, *, allow_pickle: bool = False) -> None:
    """Raise :class:`WeightsError` unless ``path`` is a weights file :func:`read_state_dict` may read."""
    if not str(path) or "\x00" in str(path):
        raise WeightsError(f"weights path {str(path)!r} is empty or holds a NUL character (use pretrained, none or "
                           "a file path)")
    path = Path(path)
    if path.is_dir():
        if (path / "retrofit_config.json").is_file():
            raise WeightsError(f"weights path {path} is a directory holding a saved se_retrofit model; it is "
                               "loaded with se_retrofit.load, not as the base model's weights (pass a state dict "
                               "file of the base model, e.g. resnet50.safetensors)")
        inside = sorted((p.name for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin")),
                        key=lambda name: (not name.endswith(".safetensors"), name))
        hint = f" such as {path / inside[0]}" if inside else " (a .safetensors state dict of the model)"
        raise WeightsError(f"weights path {path} is a directory; pass the weights file inside it{hint}")
    if not path.is_file():
        raise WeightsError(f"weights file {path} {_not_a_file(path)} (use pretrained, none or a file path)")
    if path.suffix != ".safetensors" and not allow_pickle:
        raise WeightsError(f"weights file {path} is not .safetensors; pickled torch files are read only when "
                           "you allow it (--allow-pickle, or allow_pickle=True; loaded with weights_only=True)")


def _not_a_file(path: Path) -> str:
    """What ``path`` is, when it is not a regular file: 'does not exist', 'is a FIFO', …"""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if os.path.lexists(path):
            return f"cannot be read ({error.strerror or error}{', a symbolic link' if path.is_symlink() else ''})"
        return "does not exist"
    kind = file_kind(mode)
    return f"is {kind}, not a regular file" if kind else "is not a regular file"


def file_kind(mode: int) -> str | None:
    """What a ``stat`` mode says a path is when it is not a regular file ('a directory', 'a FIFO', 'a
    character device', …); None for a regular file or a kind without a name here."""
    import stat

    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), None)


def first_sentence(error: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's message, for one-line reports."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    head = text.split(". ")[0]
    return head if len(head) <= limit else head[: limit - 1] + "…"


def load_weights_file(model: nn.Module, path: Path, *, allow_pickle: bool = False) -> None:
    """Load a state dict file strictly; the error names missing, unexpected and misshapen keys."""
    state = read_state_dict(path, allow_pickle=allow_pickle)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`WeightsError` unless ``state`` has exactly ``model``'s keys and shapes."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    misshapen = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or misshapen:
        parts = [f"{label} {len(keys)} ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected),
                                     ("wrong shape", misshapen)) if keys]
        raise WeightsError(f"weights in {where} do not match the model: {'; '.join(parts)}")
