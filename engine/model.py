"""Load a Hugging Face causal LM from a local folder with our paged attention inside.

The model code stays transformers' own; only the attention function is ours,
plugged in through transformers' AttentionInterface. Per forward, a
ForwardContext travels as a keyword argument to every layer's attention.
"""

from __future__ import annotations

import torch
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from engine.attention import ForwardContext, paged_attention
from engine.kv_cache import DTYPES, KVLayout

ATTN_IMPL = "pdserve_paged"


def _paged_attention_fn(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        sliding_window: int | None = None, pdserve_ctx: ForwardContext | None = None,
                        **_: object) -> tuple[torch.Tensor, None]:
    """transformers attention hook: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None)."""
    if pdserve_ctx is None:
        raise RuntimeError("pdserve attention called without a ForwardContext")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = paged_attention(pdserve_ctx, module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1),
                          value[0].transpose(0, 1), scale, sliding_window)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPL, _paged_attention_fn)


def load_model(path: str, dtype: str, device: torch.device | str = "cpu") -> PreTrainedModel:
    """The causal LM in `path` (a local folder), in eval mode on `device`, with pdserve's paged attention.

    Weights load straight onto the device (no second copy in host memory). On `meta` only the
    architecture is built, from the folder's config: shapes without data.
    """
    device = torch.device(device)
    if device.type == "meta":
        with device:
            model = AutoModelForCausalLM.from_config(load_config(path), attn_implementation=ATTN_IMPL,
                                                     dtype=DTYPES[dtype])
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=ATTN_IMPL, dtype=DTYPES[dtype],
                                                 local_files_only=True,
                                                 device_map=None if device.type == "cpu" else device)
    return model.eval()


def kv_layout(config: PretrainedConfig, block_size: int, dtype: str) -> KVLayout:
    text = config.get_text_config()
    num_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    return KVLayout(num_layers=text.num_hidden_layers,
                    num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
                    head_dim=head_dim, block_size=block_size, dtype=dtype)


def load_config(path: str) -> PretrainedConfig:
    return AutoConfig.from_pretrained(path, local_files_only=True)


def vocab_size(hf_config: PretrainedConfig) -> int:
    """Token ids the model takes: [0, vocab_size) of its text config (a tokenizer may know fewer or more)."""
    return hf_config.get_text_config().vocab_size
