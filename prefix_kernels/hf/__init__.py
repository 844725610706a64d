"""Hugging Face integration: the registered attention function, PrefixTuning, patch/unpatch, the PEFT bridge.

Nothing here imports transformers or PEFT at import time; they are imported when patch() or PrefixTuning needs them.
"""
