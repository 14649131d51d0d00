"""pdserve engine: paged KV cache, prefix cache and continuous batching on Hugging Face models.

Imports no Ray: the workers wrap it.
"""

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.llm import LLM
from engine.outputs import CompletionOutput, EngineStats, RequestOutput

__all__ = ["LLM", "CompletionOutput", "Engine", "EngineConfig", "EngineStats", "RequestOutput", "SamplingParams"]
