"""The transformers versions the package runs on differ in how a cache is passed; this is the one place that knows.

transformers 5.17 (the GPU image) takes the cache as `past_key_values=` in a model's forward and in generate(),
and returns it as `output.past_key_values`. From 5.2x (5.24 here) the argument is `cache=`: `past_key_values=`
still works but warns (FutureWarning, removed in 5.40), and the output field is `output.cache` (reading
`.past_key_values` logs a deprecation). The trap: 5.17 takes `cache=` silently into **kwargs and IGNORES it, so
a forward with a prefix cache runs without the prefix (no error, no gradient to the prefix, or a shape error where
the mask covers the prefix). So every call site asks here for the name instead of spelling either one.
"""
from __future__ import annotations

import inspect

# Per forward function: whether it takes `cache` (5.2x) or `past_key_values` (5.17).
_NAMES: dict = {}


def base_model(model):
    """The transformers model inside a PeftModel (get_base_model()), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def cache_argument(model) -> str:
    """The keyword under which `model` (a transformers model or a PeftModel) takes a cache, in its forward and in
    generate(): "cache" on transformers >= 5.2x, "past_key_values" before."""
    forward = type(base_model(model)).forward  # a PeftModel's forward is PEFT's; the base model's tells
    name = _NAMES.get(forward)
    if name is None:
        # inspect.signature follows the deprecate_kwarg wrapper to the function's own parameters.
        name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        _NAMES[forward] = name
    return name


def cache_kwargs(model, cache) -> dict:
    """`{name: cache}` to splat into model(...) or model.generate(...): the name this transformers understands."""
    return {cache_argument(model): cache}


def output_cache(output):
    """The cache a model output returns (`.cache` on 5.2x, `.past_key_values` on 5.17), without the deprecation."""
    if "cache" in output.keys():
        return output["cache"]
    return output.get("past_key_values")


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation (gradient) checkpointing on a transformers model: `activation_checkpointing_enable`
    from transformers 5.2x (`gradient_checkpointing_enable` warns there and goes in v6), the old name on 5.17."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_activation_checkpointing(model) -> bool:
    """Whether checkpointing is on (`is_activation_checkpointing` from 5.2x, `is_gradient_checkpointing` on 5.17)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)
