"""Built-in models: small randomly initialised checkpoints that need no download.

`path(name)` returns a local Hugging Face style folder (config.json,
model.safetensors, generation_config.json, tokenizer files with a ChatML chat
template) that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load offline.

Invariants:
- Weights are a pure function of (name, model spec, SEED, GENERATOR_VERSION):
  the same float32 bytes on every machine. Every tensor is drawn from one
  `torch.Generator` in a fixed order, as a *uniform* distribution mapped with
  exact or singly rounded float32 arithmetic; normal sampling is avoided
  because its vectorised log/cos differ in the last bit between CPUs.
  A model whose config names another dtype (`llama-1b-shape`: bfloat16)
  is stored rounded to it, a deterministic cast of those float32 values.
- The folder lives at `<cache>/models/<name>-<hash>` (engine/model_store.py:
  built once, complete when it exists), and the hash covers the spec, the
  seed, the generator version and the shipped tokenizer.
- Token ids: 0 <|endoftext|> (pad, end of text), 1 <|im_start|>,
  2 <|im_end|> (chat end); no BOS token. Generation stops on 2 or 0.

Initialisation: std-0.02 random transformers collapse to 2-3 repeated tokens
under greedy decoding, so scales here keep every sublayer's output at the size
of its (normalised) input, make attention fairly sharp and logits spread out;
greedy continuations are then varied and depend on far context (see
tests/test_tiny_model.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path
from typing import Any

import torch

from engine.model_store import build_once, models_dir

SEED = 20240611
# Bump when the weight recipe (order, distributions, scales) changes: it
# changes the cache key, so stale folders are never reused.
GENERATOR_VERSION = 1

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_FILE = ASSETS / "tokenizer.json"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2

# Shared by every model: architecture-independent config.json fields.
_COMMON: dict[str, Any] = {
    "vocab_size": 8192,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    "pad_token_id": ENDOFTEXT_ID,
    "dtype": "float32",
}

_TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
}

# Model name -> config.json fields (transformers' model_type picks the class).
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **_TINY_SHAPE},
    "small": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "intermediate_size": 2560,
    },
    # Qwen2 derives head_dim from hidden_size / heads (16 here) and has q/k/v biases.
    "tiny-qwen2": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        **{k: v for k, v in _TINY_SHAPE.items() if k != "head_dim"},
        "use_sliding_window": False,
        "sliding_window": None,
    },
    "tiny-mistral": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        **_TINY_SHAPE,
        "sliding_window": 32,
    },
    # GPU benchmarks: the shape of a 1B Llama (Llama 3.2 1B's layers, grouped-query attention),
    # about 1.0e9 parameters. The vocabulary stays the shipped tokenizer's 8192 tokens instead of
    # a real 1B model's 128k, so the embedding and lm_head are 34M of the total rather than 525M.
    # Stored in bfloat16 (2 GB instead of 4; the weights are drawn in float32 as for every model,
    # then rounded once), as GPU engines run it.
    "llama-1b-shape": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "dtype": "bfloat16",
    },
}
NAMES: tuple[str, ...] = tuple(CONFIGS)

# Initialisation scales, as multiples of 1/sqrt(fan_in) unless noted.
_INIT: dict[str, float] = {
    "embed_std": 1.0,  # absolute: the residual stream starts at rms 1
    "qk_gain": 2.0,  # attention logits of std ~gain^2 -> peaked, position-dependent attention
    "proj_gain": 1.0,  # v, o, gate, up, down keep rms ~1 per sublayer
    "lm_head_gain": 3.0,  # logits std ~3: clear top-1 margins, but not one dominant token
    "norm_spread": 0.25,  # absolute: RMSNorm weights in 1 +- spread, so ignoring them shows
    "bias_std": 0.5,  # absolute: q/k/v biases large enough that dropping them changes outputs
}

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- elif message['content'] -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def path(name: str = "tiny") -> str:
    """Local folder of built-in model `name` (one of NAMES), built on first use (once, whoever asks)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(NAMES)}")
    tokenizer_json = TOKENIZER_FILE.read_bytes()
    final = models_dir() / f"{name}-{cache_key(name, tokenizer_json)}"
    return build_once(final, "model.safetensors", lambda folder: _write_folder(folder, name, tokenizer_json))


def cache_key(name: str, tokenizer_json: bytes) -> str:
    """Short hex digest of everything the folder's contents depend on."""
    recipe = {
        "name": name,
        "config": CONFIGS[name],
        "common": _COMMON,
        "init": _INIT,
        "seed": SEED,
        "generator_version": GENERATOR_VERSION,
        "tokenizer_sha256": hashlib.sha256(tokenizer_json).hexdigest(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def make_config(name: str) -> Any:
    """The transformers config object of built-in model `name`."""
    from transformers import AutoConfig

    fields = {**_COMMON, **CONFIGS[name]}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def make_weights(name: str) -> dict[str, torch.Tensor]:
    """Deterministic float32 state dict of built-in model `name` (HF parameter names)."""
    cfg = {**_COMMON, **CONFIGS[name]}
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim", hidden // heads)
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    has_bias = cfg["model_type"] == "qwen2"

    def fan_in(gain: float, n: int) -> float:
        return gain / math.sqrt(n)

    # (name, shape, kind, std) in generation order; the order is part of the recipe.
    plan: list[tuple[str, tuple[int, ...], str, float]] = [
        ("model.embed_tokens.weight", (vocab, hidden), "sym", _INIT["embed_std"])
    ]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        plan.append((p + "input_layernorm.weight", (hidden,), "norm", _INIT["norm_spread"]))
        for proj, out, gain in (("q", q_out, _INIT["qk_gain"]), ("k", kv_out, _INIT["qk_gain"]),
                                ("v", kv_out, _INIT["proj_gain"])):
            plan.append((f"{p}self_attn.{proj}_proj.weight", (out, hidden), "sym", fan_in(gain, hidden)))
            if has_bias:
                plan.append((f"{p}self_attn.{proj}_proj.bias", (out,), "sym", _INIT["bias_std"]))
        plan.append((p + "self_attn.o_proj.weight", (hidden, q_out), "sym", fan_in(_INIT["proj_gain"], q_out)))
        plan.append((p + "post_attention_layernorm.weight", (hidden,), "norm", _INIT["norm_spread"]))
        for proj in ("gate", "up"):
            plan.append((f"{p}mlp.{proj}_proj.weight", (inter, hidden), "sym",
                         fan_in(_INIT["proj_gain"], hidden)))
        plan.append((p + "mlp.down_proj.weight", (hidden, inter), "sym", fan_in(_INIT["proj_gain"], inter)))
    plan.append(("model.norm.weight", (hidden,), "norm", _INIT["norm_spread"]))
    plan.append(("lm_head.weight", (vocab, hidden), "sym", fan_in(_INIT["lm_head_gain"], hidden)))

    # The name enters the seed so same-shaped models (tiny, tiny-mistral) differ.
    gen = torch.Generator(device="cpu").manual_seed(SEED + zlib.crc32(name.encode()))
    weights: dict[str, torch.Tensor] = {}
    for pname, shape, kind, scale in plan:
        # rand gives k * 2^-24 (exact); *2 and -1 are exact; one rounded multiply
        # (and one rounded add for norms) follow, so every CPU gets the same bits.
        u = torch.rand(shape, generator=gen, dtype=torch.float32).mul_(2.0).sub_(1.0)
        if kind == "sym":  # uniform on [-a, a) has std a / sqrt(3)
            weights[pname] = u.mul_(scale * math.sqrt(3.0))
        else:  # "norm": uniform around 1 with half-width `scale`
            weights[pname] = u.mul_(scale).add_(1.0)
    return weights


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _COMMON["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }


def _write_folder(folder: Path, name: str, tokenizer_json: bytes) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    make_config(name).save_pretrained(folder)
    GenerationConfig(
        bos_token_id=None, eos_token_id=list(_COMMON["eos_token_id"]), pad_token_id=ENDOFTEXT_ID
    ).save_pretrained(folder)
    weights = make_weights(name)
    dtype = getattr(torch, {**_COMMON, **CONFIGS[name]}["dtype"])
    for key in weights:  # one tensor at a time, so the float32 and rounded copies never coexist whole
        weights[key] = weights[key].to(dtype)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.json").write_bytes(tokenizer_json)
    _write_json(folder / "tokenizer_config.json", _tokenizer_config())
    _write_json(folder / "special_tokens_map.json", {
        "eos_token": IM_END, "pad_token": ENDOFTEXT, "additional_special_tokens": [IM_START, IM_END],
    })


def _write_json(file: Path, obj: dict[str, Any]) -> None:
    file.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
