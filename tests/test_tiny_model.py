"""Built-in models and their tokenizer: loadable by transformers offline,
byte-for-byte deterministic, and random in a way that makes token-equality
tests meaningful (varied greedy outputs that depend on far context)."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from engine import models as model_names
from engine import tiny_model

TINY_NAMES = ("tiny", "tiny-qwen2", "tiny-mistral")
ARCH = {"tiny": "LlamaForCausalLM", "small": "LlamaForCausalLM",
        "tiny-qwen2": "Qwen2ForCausalLM", "tiny-mistral": "MistralForCausalLM"}
# sha256 over (name, raw float32 bytes) of every tensor in sorted name order.
# A change means the weights differ from every previously built cache: bump
# tiny_model.GENERATOR_VERSION on purpose, then update these.
GOLDEN_DIGESTS = {
    "tiny": "0c9191515f9207f1433b6ad8ba24b6bc80d5cd19d2e14c21bfcfe04ee3575f22",
    "tiny-qwen2": "02b2bb3e49b80d232d4c08a59918967b3aa6c0e6bd0524bc32cc8a5631fef45e",
    "tiny-mistral": "be41936b21a457ad37c2a5ae07e1501074a283e368a8ca2055beedfbcddeea30",
}
PROMPT_LENS = (10, 23, 37, 55, 80, 110, 150, 200)
ROUND_TRIP = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  \n\n\ttabs\r\nwindows newlines ",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 中文, עברית, العربية",
    "emoji 🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 and symbols ∑∫√∞ ≠ ≤ → ©®™ \u200b zero-width",
    "def f(x: int) -> int:\n    return {'a': [x ** 2, x // 3]}['a'][0]  # comment\n",
    "spaces before punctuation , . ! ? and 'quotes' \"double\" don't",
    "<|im_start|>user\nliteral special tokens<|im_end|>\n<|endoftext|>",
    "",
]


@pytest.fixture(autouse=True)
def _quiet_transformers():
    # Progress bars and info logs from from_pretrained are noise in test output.
    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Models this small gain nothing from intra-op threads, and OpenMP barriers
    # stall badly when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """One private cache for the module, so tests never touch ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("pdserve-cache")
        mp.setenv("PDSERVE_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def models(cache_dir: Path):
    """Name -> eval-mode HF model (eager attention, float32), loaded once per module."""
    loaded: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in loaded:
            loaded[name] = AutoModelForCausalLM.from_pretrained(
                tiny_model.path(name), attn_implementation="eager"
            ).eval()
        return loaded[name]

    return get


def _prompts() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(3, 8192, (1, n), generator=gen) for n in PROMPT_LENS]


def _digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(weights[key].numpy().tobytes())
    return h.hexdigest()


def test_names_and_unknown_name(cache_dir: Path) -> None:
    assert tiny_model.NAMES == ("tiny", "small", "tiny-qwen2", "tiny-mistral", "llama-1b-shape")
    with pytest.raises(ValueError, match="unknown built-in model"):
        tiny_model.path("huge")


@pytest.mark.parametrize("name", TINY_NAMES)
def test_folder_loads_with_auto_classes(name: str, cache_dir: Path, models) -> None:
    folder = Path(tiny_model.path(name))
    assert folder.parent == cache_dir / "models" and folder.name.startswith(name + "-")
    for file in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (folder / file).is_file(), file

    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.architectures == [ARCH[name]]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (8192, 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 128)
    assert cfg.max_position_embeddings == 4096
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.eos_token_id == [2, 0] and cfg.pad_token_id == 0 and cfg.bos_token_id is None
    assert getattr(cfg, "sliding_window", None) == (32 if name == "tiny-mistral" else None)
    gen_cfg = GenerationConfig.from_pretrained(folder)
    assert gen_cfg.eos_token_id == [2, 0] and gen_cfg.pad_token_id == 0

    model = models(name)
    assert type(model).__name__ == ARCH[name]
    state = model.state_dict()
    expected = tiny_model.make_weights(name)
    assert set(state) == set(expected)  # nothing missing, nothing left randomly initialised
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], expected[k]) for k in expected)
    assert ("model.layers.0.self_attn.q_proj.bias" in state) == (name == "tiny-qwen2")


@pytest.mark.parametrize("name", TINY_NAMES)
def test_weights_match_golden_digest(name: str) -> None:
    assert _digest(tiny_model.make_weights(name)) == GOLDEN_DIGESTS[name]


def test_build_is_byte_identical_across_cache_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = []
    for sub in ("a", "b"):
        monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / sub))
        folders.append(Path(tiny_model.path("tiny")))
    assert folders[0].name == folders[1].name
    for file in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folders[0] / file).read_bytes() == (folders[1] / file).read_bytes(), file


def test_second_call_uses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    first = tiny_model.path("tiny")

    def fail(*args: object) -> None:
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny_model, "_write_folder", fail)
    assert tiny_model.path("tiny") == first


def test_concurrent_builds_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    barrier = threading.Barrier(4)

    def build(_: int) -> str:
        barrier.wait()  # maximise overlap: all four build, one rename wins
        return tiny_model.path("tiny-qwen2")

    with ThreadPoolExecutor(4) as pool:
        results = set(pool.map(build, range(4)))
    assert len(results) == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [Path(results.pop()).name]


@pytest.mark.parametrize("name", TINY_NAMES)
def test_greedy_outputs_are_varied(name: str, models) -> None:
    model = models(name)
    outputs, gaps = [], []
    with torch.no_grad():
        for prompt in _prompts():
            logits = model(prompt).logits[0]
            assert torch.isfinite(logits).all()
            top2 = logits.topk(2, dim=-1).values
            gaps.append(top2[:, 0] - top2[:, 1])
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=40, do_sample=False)
            outputs.append(tuple(out[0, prompt.shape[1]:].tolist()))
    distinct = [len(set(o)) for o in outputs]
    assert sum(distinct) / len(distinct) >= 15, distinct
    assert len(set(outputs)) == len(outputs), "different prompts gave the same continuation"
    gap = torch.cat(gaps)
    # Margins far above fp32 noise (~1e-5), so argmax is stable across kernels...
    assert gap.median() > 0.1 and (gap < 1e-3).float().mean() < 0.02
    # ...but not a single dominant token.
    assert gap.median() < 5.0


@pytest.mark.parametrize("name", ("tiny", "tiny-qwen2"))
def test_far_context_changes_next_token_logits(name: str, models) -> None:
    # A model that ignores attention would pass KV-cache tests even with a broken cache.
    model = models(name)
    prompt = _prompts()[-1]
    edited = prompt.clone()
    edited[0, 0] = 3 + (int(edited[0, 0]) + 1000) % 8189
    with torch.no_grad():
        delta = (model(prompt).logits[0, -1] - model(edited).logits[0, -1]).abs().max()
    assert delta > 0.05


def test_mistral_sliding_window_matters(models) -> None:
    windowed = models("tiny-mistral")
    full = AutoModelForCausalLM.from_pretrained(
        tiny_model.path("tiny-mistral"), attn_implementation="eager", sliding_window=None
    ).eval()
    short, long = _prompts()[1], _prompts()[4]  # 23 and 80 tokens vs a window of 32
    with torch.no_grad():
        assert torch.allclose(windowed(short).logits, full(short).logits, atol=1e-5)
        assert (windowed(long).logits[0, -1] - full(long).logits[0, -1]).abs().max() > 0.05


def test_small_builds_at_benchmark_scale(cache_dir: Path) -> None:
    folder = Path(tiny_model.path("small"))
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.architectures == [ARCH["small"]] and cfg.num_key_value_heads < cfg.num_attention_heads
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert 90e6 <= sum(torch.Size(s).numel() for s in shapes.values()) <= 110e6
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    assert shapes == {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    shutil.rmtree(folder)  # 400 MB; pytest keeps recent temp dirs around


def test_llama_1b_shape_is_about_1e9_parameters_on_the_meta_device() -> None:
    # Never built here: 1e9 parameters are 4 GB while drawn in float32 (2 GB stored in bfloat16).
    cfg = tiny_model.make_config("llama-1b-shape")
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (2048, 16, 8192)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 64)
    # The shipped tokenizer's vocabulary, not a real 1B model's: every built-in model shares it.
    assert cfg.vocab_size == Tokenizer.from_file(str(tiny_model.TOKENIZER_FILE)).get_vocab_size() == 8192
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    count = sum(p.numel() for p in skeleton.parameters())
    assert 0.95e9 <= count <= 1.05e9, count
    assert "llama-1b-shape" in model_names.NAMES  # what models.resolve accepts


def test_folder_stores_the_dtype_its_config_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # llama-1b-shape's bfloat16 storage, on a copy of tiny: the float32 recipe rounded once.
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(tiny_model.CONFIGS, "tiny-bf16", {**tiny_model.CONFIGS["tiny"], "dtype": "bfloat16"})
    folder = Path(tiny_model.path("tiny-bf16"))
    assert AutoConfig.from_pretrained(folder).dtype == torch.bfloat16
    expected = tiny_model.make_weights("tiny-bf16")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        for key in expected:
            stored = f.get_tensor(key)
            assert stored.dtype == torch.bfloat16 and torch.equal(stored, expected[key].to(torch.bfloat16)), key
    # The float32 models are unchanged: their folders hold the recipe's bytes.
    with safe_open(str(Path(tiny_model.path("tiny")) / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_tokenizer_asset_ids_and_size() -> None:
    assert tiny_model.TOKENIZER_FILE.stat().st_size < 1 << 20
    tok = Tokenizer.from_file(str(tiny_model.TOKENIZER_FILE))
    assert tok.get_vocab_size() == 8192
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]


@pytest.mark.parametrize("text", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_tokenizer_round_trips(text: str, cache_dir: Path) -> None:
    raw = Tokenizer.from_file(str(tiny_model.TOKENIZER_FILE))
    ids = raw.encode(text).ids
    assert raw.decode(ids, skip_special_tokens=False) == text
    hf = AutoTokenizer.from_pretrained(tiny_model.path("tiny"))
    assert hf(text)["input_ids"] == ids  # no BOS/EOS added, same ids as the raw tokenizer
    assert hf.decode(ids) == text


def test_chat_template(cache_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model.path("tiny"))
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2, "<|endoftext|>", 0)
    assert tok.bos_token is None and tok.model_max_length == 4096
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages, tokenize=False).endswith("Bye<|im_end|>\n")
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == tok(text)["input_ids"] and ids[0] == 1 and ids.count(2) == 4
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert tok.apply_chat_template(parts, tokenize=False) == "<|im_start|>user\nHi there<|im_end|>\n"
    assert json.loads((Path(tiny_model.path("tiny")) / "tokenizer_config.json").read_text())["chat_template"]
