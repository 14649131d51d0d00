"""Train the byte-level BPE tokenizer shipped with the built-in models.

Run once by hand; the output, `engine/assets/tokenizer.json`, is committed and
is the source of truth (token ids must be identical on every machine, so
nothing retrains it at run time):

    python engine/assets/build_tokenizer.py [--out PATH]

Corpus: English prose available offline on any CPython install - the
docstrings, comments and long string literals (e.g. pydoc's topic help) of
the standard library sources under the running interpreter's lib dir, read in
sorted path order. Training is deterministic for a given corpus, so the same
CPython version and `tokenizers` version reproduce the committed file byte
for byte; another CPython version gives a different (equally valid) file.

Invariants of the output: vocab size 8192; ids 0, 1, 2 are the special tokens
<|endoftext|>, <|im_start|>, <|im_end|>; all 256 byte symbols are in the
vocab, so any UTF-8 string round-trips through encode/decode.
"""

from __future__ import annotations

import argparse
import ast
import io
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MIN_LITERAL_CHARS = 200  # shorter string literals are mostly identifiers/format strings, not prose
DEFAULT_OUT = Path(__file__).resolve().parent / "tokenizer.json"


def stdlib_sources() -> list[Path]:
    """The standard library's .py files, in sorted order, third-party packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def _comments(source: str) -> Iterator[str]:
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if text:
                    yield text
    except (tokenize.TokenError, SyntaxError):
        return


def _prose_literals(source: str) -> Iterator[str]:
    # Docstrings are string-constant expressions; long literals elsewhere are
    # mostly help texts. Both are plain English with some code mixed in.
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _is_prose(node.value):
            yield node.value


def _is_prose(text: str) -> bool:
    try:
        text.encode("utf-8")  # test data holds lone surrogates, which UTF-8 cannot carry
    except UnicodeEncodeError:
        return False
    return len(text) >= MIN_LITERAL_CHARS or ("\n" not in text and len(text.split()) >= 4)


def corpus() -> Iterator[str]:
    """Training texts, one per docstring/literal plus one per file for its comments."""
    for path in stdlib_sources():
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield from _prose_literals(source)
        comments = "\n".join(_comments(source))
        if comments:
            yield comments


def build() -> Tokenizer:
    """A trained tokenizer (GPT-2 style byte-level BPE, no prefix space, no BOS)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets covering the spaces merged into tokens.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    tok = build()
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i, (special, tok.token_to_id(special))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    tok.save(str(args.out), pretty=False)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
