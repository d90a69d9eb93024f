"""`ModelConfig`: the few numbers the native engine needs, read from an HF config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURES = ("llama", "gpt2")

# HF activation names -> ours. "gelu_tanh" is GELU with the tanh approximation (HF gelu_new).
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass
class ModelConfig:
    """Architecture hyper-parameters of a Llama-family or GPT-2-family decoder.

    `rope_scaling` is None or a dict with "rope_type" in ("llama3", "linear") and HF's keys
    ("factor", and for llama3 "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"). GPT-2 ignores the rope fields.
    """

    architecture: str  # "llama" | "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float  # RMSNorm eps (llama) or LayerNorm eps (gpt2)
    hidden_act: str = "silu"  # "silu" (llama), "gelu_tanh" or "gelu" (gpt2)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # llama: bias on qkv and o projections (gpt2 always has it)
    mlp_bias: bool = False  # llama: bias on gate/up/down projections
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        """Build from the config.json of an HF model folder."""
        return cls.from_hf_config(json.loads((folder / "config.json").read_text()))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the dict of an HF config.json (LlamaForCausalLM or GPT2LMHeadModel)."""
        model_type = hf.get("model_type")
        if model_type == "llama":
            return cls._from_llama(hf)
        if model_type == "gpt2":
            return cls._from_gpt2(hf)
        raise ValueError(f"the native backend supports model_type 'llama' and 'gpt2', not {model_type!r}")

    @classmethod
    def _from_llama(cls, hf: dict[str, Any]) -> ModelConfig:
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported llama hidden_act {hf['hidden_act']!r}")
        num_heads = hf["num_attention_heads"]
        # transformers >= 5 writes "rope_parameters" (theta + scaling in one dict); older ones
        # write "rope_theta" and "rope_scaling".
        rope = hf.get("rope_parameters") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or rope
        return cls(
            architecture="llama",
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=_normalize_rope_scaling(scaling),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_ids(hf.get("eos_token_id")),
        )

    @classmethod
    def _from_gpt2(cls, hf: dict[str, Any]) -> ModelConfig:
        act = hf.get("activation_function", "gelu_new")
        if act not in _GPT2_ACTIVATIONS:
            raise ValueError(f"unsupported gpt2 activation_function {act!r}")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise ValueError("gpt2 configs with non-standard attention scaling are not supported")
        hidden, heads = hf["n_embd"], hf["n_head"]
        return cls(
            architecture="gpt2",
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            num_layers=hf["n_layer"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=hf.get("n_inner") or 4 * hidden,
            max_position_embeddings=hf.get("n_positions", 1024),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            hidden_act=_GPT2_ACTIVATIONS[act],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_ids(hf.get("eos_token_id")),
        )


def _as_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


def _normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """HF rope_scaling -> None, or a dict whose "rope_type" is "llama3" or "linear"."""
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in ("llama3", "linear"):
        raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: llama3, linear)")
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    out["rope_type"] = rope_type
    return out
