"""A backbone's weights: the library's pretrained ones, a local file (read safely and fitted
strictly to the model's keys), or random ones from a seed."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ekx import EkxError
from ekx.cache.store import sha256_file
from ekx.extract.backbone_spec import Backbone


def _strip_classifier(state: dict, model: nn.Module) -> dict:
    """Keep the keys the headless model has (drops fc./classifier. of a full checkpoint)."""
    keys = set(model.state_dict())
    return {k: v for k, v in state.items() if k in keys}


def read_state_file(path: Path) -> dict:
    """A local weights file as a state dict of tensors: safetensors, or a torch file loaded
    with weights_only=True (never pickled code); the usual wrappers are unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors' own error names neither the file nor the way out
            raise EkxError(
                f"{path}: not a readable .safetensors file ({type(e).__name__}: {str(e).splitlines()[0][:120]}): "
                "it is damaged or not safetensors; copy it again, or pass a torch state dict"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message would advise weights_only=False: never repeat it
        raise EkxError(
            f"{path}: not a safe tensor file ({type(e).__name__}): --weights takes a state dict of "
            f"plain tensors (torch.save(model.state_dict(), ...)), a .safetensors file or an ekx "
            "finetune checkpoint"
        ) from None
    if not isinstance(state, dict):
        raise EkxError(f"{path}: not a state dict (a {type(state).__name__})")
    # ekx finetune, timm/Lightning, DeiT-style, PySlowFast (Auditory SlowFast, EPIC-Sounds, TIM)
    for key in ("backbone", "state_dict", "model", "model_state"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    return state


# prefixes a checkpoint of a larger model puts before the backbone's own keys: DDP, a whole
# CLIP model (its image tower), a Hugging Face task model (its encoder), a detector's backbone
PREFIXES = ("", "module.", "visual.", "module.visual.", "videomae.", "model.", "backbone.", "module.backbone.")
# ...and the one ekx's wrapper puts before the library's keys (a Hugging Face clip model's
# `model.`: a file saved from the library's own model lacks it)
OWN_PREFIXES = ("", "model.")


def fit_state(state: dict, model: nn.Module, path: Path, name: str, classifier: tuple[str, ...] = ()) -> dict:
    """The file's tensors under the model's own key names, strictly. A known prefix is
    stripped (the keys outside it are the larger model around the backbone: a CLIP text
    tower, a task model's head) and the classifier the headless backbone removed is dropped;
    any other key the file lacks or has beyond the model, or a tensor of another shape,
    refuses the file, naming the first keys."""
    own = model.state_dict()
    renamings = (
        {q + k[len(p) :]: v for k, v in state.items() if k.startswith(p)} for p in PREFIXES for q in OWN_PREFIXES
    )
    body = max(renamings, key=lambda d: sum(k in own for k in d))  # the first of the best: no prefix wins ties
    missing = [k for k in own if k not in body]
    extra = [k for k in body if k not in own and not any(k == c or k.startswith(c + ".") for c in classifier)]
    wrong = [
        f"{k} {tuple(getattr(v, 'shape', ())) if isinstance(v, torch.Tensor) else type(v).__name__} "
        f"where the model has {tuple(own[k].shape)}"
        for k, v in body.items()
        if k in own and not (isinstance(v, torch.Tensor) and v.shape == own[k].shape)
    ]
    bad = [
        f"{len(keys)} {what}, e.g. {', '.join(keys[:3])}"
        for keys, what in ((missing, "missing keys"), (extra, "unexpected keys"), (wrong, "of another shape"))
        if keys
    ]
    if bad:
        raise EkxError(
            f"{path}: not a {name} state dict ({'; '.join(bad)}): pass the weights of this very "
            "architecture, --weights DEFAULT or --weights none"
        )
    return {k: v for k, v in body.items() if k in own}  # the classifier's keys go


def load_weights(backbone: Backbone, weights: str, seed: int = 0) -> tuple[nn.Module, str]:
    """Build the model and load weights; returns (model in eval mode, weights identity).

    ``DEFAULT`` (or an enum name like ``IMAGENET1K_V2``): torchvision's pretrained weights,
    from the torch cache or downloaded to it (a family's model: its library's pretrained
    weights, from that library's cache or hub); a path: a local state dict (torch file
    loaded with weights_only=True, or safetensors); ``none``: random init from ``seed``
    (see `calibrate_batchnorm`), the same in every process, so shards and resumed runs agree.
    """
    if weights == "DEFAULT" and backbone.pretrained is not None:
        model, ident = backbone.pretrained()
        return model.eval(), ident
    if weights.lower() == "none":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return backbone.build().eval(), "none"
    shell = _shell(backbone)  # key names and dtypes; its tensors come from the weights
    path = Path(weights)
    if path.is_file():
        state = fit_state(read_state_file(path), shell, path, backbone.name, backbone.classifier)
        return _filled(backbone, shell, state).eval(), f"sha256:{sha256_file(path)}"
    if "/" in weights or weights.endswith((".pt", ".pth", ".safetensors", ".bin")):
        raise EkxError(f"--weights {weights}: file not found")
    if backbone.weights is None:
        raise EkxError(f"--weights {weights}: {backbone.name} takes DEFAULT (its library's weights), a file, or none")
    try:
        enum = backbone.weights[weights] if weights != "DEFAULT" else backbone.weights.DEFAULT
    except KeyError:
        names = ", ".join(w.name for w in backbone.weights)
        raise EkxError(
            f"--weights {weights}: not a weights name of {backbone.name} (DEFAULT, {names}, a state-dict path, or none)"
        ) from None
    try:
        state = enum.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
        raise EkxError(
            f"cannot get {backbone.name} weights {enum} ({type(e).__name__}: {e}); either put "
            f"the file at {cache} (from {enum.url}), or pass --weights PATH to a local state dict "
            "(or --weights none for random features)"
        ) from None
    ident = f"torchvision:{type(enum).__name__}.{enum.name}"
    return _filled(backbone, shell, _strip_classifier(state, shell)).eval(), ident


def _shell(backbone: Backbone) -> nn.Module:
    """The model built on the meta device: no memory, and none of the random init that the
    weights would overwrite (resnet50's init was 0.5 s of every extraction's start-up). A
    model whose constructor reads values (timm's drop-path schedule) is built for real."""
    try:
        with torch.device("meta"):
            return backbone.build()
    except Exception:
        with torch.random.fork_rng():  # the caller's random state stays as it was
            return backbone.build()


def _filled(backbone: Backbone, shell: nn.Module, state: dict) -> nn.Module:
    """The shell given the state dict's tensors (cast to the model's own dtypes, as a copy
    into built parameters would); a model with tensors no state dict holds (non-persistent
    buffers) is built for real instead."""
    own = shell.state_dict()
    shell.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, assign=True)
    if not any(t.is_meta for t in (*shell.parameters(), *shell.buffers())):
        return shell
    with torch.random.fork_rng():
        model = backbone.build()
    model.load_state_dict(state)
    return model
