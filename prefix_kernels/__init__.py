"""Attention over a shared prefix KV plus each sequence's own KV, without materializing the concatenation."""
from .attention import prefix_attention
from .merge import merge_attention_states
from . import reference
from .hf.patch import patch, unpatch
from .hf.prefix_tuning import PrefixTuning

__all__ = ["prefix_attention", "merge_attention_states", "reference", "PrefixTuning", "patch", "unpatch",
           "SharedPrefixCache"]


def __getattr__(name):
    # SharedPrefixCache subclasses a transformers cache: imported (with transformers) on first use only.
    if name == "SharedPrefixCache":
        from .hf.cache import SharedPrefixCache

        return SharedPrefixCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
