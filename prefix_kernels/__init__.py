"""Attention over a shared prefix KV plus each sequence's own KV, without materializing the concatenation."""
from .attention import prefix_attention
from .merge import merge_attention_states
from . import reference
from .hf.lean import lean_training
from .hf.patch import patch, unpatch
from .hf.prefix_tuning import PrefixTuning

__all__ = ["prefix_attention", "merge_attention_states", "reference", "PrefixTuning", "patch", "unpatch",
           "lean_training", "SharedPrefixCache", "StaticSharedPrefixCache"]

_CACHES = ("SharedPrefixCache", "StaticSharedPrefixCache")


def __getattr__(name):
    # The caches subclass transformers caches: imported (with transformers) on first use only.
    if name in _CACHES:
        from .hf import cache

        return getattr(cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
