"""A GGUF file's tokenizer (tokenizer.ggml.*) rebuilt as a `tokenizers` Tokenizer.

Two vocabularies exist in llama.cpp files: "gpt2" (byte-level BPE with a merge list: Llama 3,
SmolLM, Qwen...) and "llama" (SentencePiece BPE with scores and byte fallback: Llama 2,
Mistral, TinyLlama). The pre-tokenizer regex of a byte-level BPE is named by
tokenizer.ggml.pre; the names we know are mapped below, any other is refused rather than
silently tokenized differently from the model's training.
"""

from __future__ import annotations

from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)

from hybridgraph.model.gguf_file import GGUFError, GGUFFile

# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_pre(pre: str, name: str) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2", "gpt-2"):
        return byte_level
    if pre == "smollm":  # SmolLM's tokenizer.json: digits split one by one, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level])
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise GGUFError(f"{name}: tokenizer.ggml.pre {pre!r} is not supported (known: default, "
                    "gpt2, smollm, llama-bpe); pass --tokenizer with a tokenizer.json")


def _spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps no merge list: a merge (a, b) exists where a, b and a+b are
    all pieces, ranked by the merged piece's score (higher merges first)."""
    found: list[tuple[float, int, int, str, str]] = []
    for piece, pid in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                found.append((-scores[pid], vocab[left], vocab[right], left, right))
    found.sort()
    return [(a, b) for _, _, _, a, b in found]


def gguf_tokenizer(g: GGUFFile) -> tuple[Tokenizer, dict[str, Any]]:
    """(tokenizer, info) where info has bos_token, eos_token (strings) and add_bos."""
    name = g.path.name
    kind = g.get("tokenizer.ggml.model")
    tokens = g.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise GGUFError(f"{name} has no tokenizer (tokenizer.ggml.model / tokens); "
                        "pass --tokenizer with a tokenizer.json")
    types = g.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):  # duplicate pieces: keep the first id of each
        vocab = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)
    unk_id = g.get("tokenizer.ggml.unknown_token_id")
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in g.get("tokenizer.ggml.merges") or []]
        pre = g.get("tokenizer.ggml.pre", "default")
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in ("llama-bpe", "llama3")))
        tok.pre_tokenizer = _byte_level_pre(pre, name)
        tok.decoder = decoders.ByteLevel()
        add_bos_default = False
    elif kind == "llama":
        scores = g.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = tokens[unk_id] if unk_id is not None else None
        tok = Tokenizer(models.BPE(vocab, _spm_merges(vocab, scores), unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
        # As transformers' LlamaTokenizerFast: spaces become ▁, and one ▁ is prepended to
        # the text unless it starts with one already.
        prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
        strip = [decoders.Strip(" ", 1, 0)] if prefix else []
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), *strip])
        add_bos_default = True
    else:
        raise GGUFError(f"{name}: tokenizer model {kind!r} (tokenizer.ggml.model) is not "
                        "supported (gpt2 or llama); pass --tokenizer with a tokenizer.json")
    # Control tokens are special (skipped when decoding for the user); user-defined ones are
    # ordinary text that must never be split.
    added = [AddedToken(t, special=ty == _CONTROL, normalized=False)
             for t, ty in zip(tokens, types, strict=True) if ty in (_CONTROL, _USER_DEFINED)]
    if added:
        tok.add_tokens(added)
    bos_id = g.get("tokenizer.ggml.bos_token_id")
    eos_id = g.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(g.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos_id is not None
    if add_bos:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    info = {"bos_token": tokens[bos_id] if bos_id is not None and bos_id < len(tokens) else "",
            "eos_token": tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else "",
            "add_bos": add_bos}
    return tok, info
