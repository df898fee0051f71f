"""The text tokenizer: found offline, or built locally for untrained models.

CLAP's text tower is RoBERTa, so text needs the roberta-base tokenizer files
(``vocab.json`` and ``merges.txt``). They are small but not inside the
checkpoint, and clap-ws never downloads anything unless asked. Lookup order:

1. a directory given explicitly (``--tokenizer DIR`` / ``CLAP_TOKENIZER_DIR``);
2. ``<cache dir>/roberta-base/``, where ``clap-ws download`` puts them;
3. the local Hugging Face cache (``local_files_only=True``: no network).

When none has them, :func:`find_tokenizer` returns ``None`` and the server
answers text requests with ``text_unavailable`` while audio keeps working.

Untrained models get :func:`byte_level_tokenizer`: a RoBERTa tokenizer with
roberta-base's special-token ids and a byte-level alphabet, built in memory.
Its ids are valid for the model, so text paths are testable offline; like the
untrained weights, its output means nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

MAX_TOKENS = 77  # CLAP's text context length
_log = logging.getLogger(__name__)


def byte_level_tokenizer():
    """A RoBERTa-compatible tokenizer that needs no files (for ``--untrained``)."""
    from tokenizers import pre_tokenizers
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[])


def _hub_cache_dir() -> Path | None:
    """The local Hugging Face snapshot holding roberta-base's files, if any (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo in ("FacebookAI/roberta-base", "roberta-base"):
        vocab = try_to_load_from_cache(repo, "vocab.json")
        if isinstance(vocab, str) and (Path(vocab).parent / "merges.txt").is_file():
            return Path(vocab).parent
    return None


def tokenizer_candidates(explicit: str | os.PathLike | None, cache_dir: Path) -> list[Path]:
    """Directories searched for tokenizer files, in order."""
    out = []
    if explicit:
        out.append(Path(explicit).expanduser())
    elif os.environ.get("CLAP_TOKENIZER_DIR"):
        out.append(Path(os.environ["CLAP_TOKENIZER_DIR"]).expanduser())
    out.append(cache_dir / "roberta-base")
    hub = _hub_cache_dir()
    if hub is not None:
        out.append(hub)
    return out


def find_tokenizer(explicit: str | os.PathLike | None, cache_dir: Path):
    """Load the roberta-base tokenizer from local files, or return None.

    Only folders that really hold ``vocab.json`` and ``merges.txt`` are tried:
    recent transformers return an empty five-token tokenizer, not an error,
    when asked for files that are not there.
    """
    from transformers import RobertaTokenizer

    for directory in tokenizer_candidates(explicit, cache_dir):
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            return RobertaTokenizer.from_pretrained(str(directory), local_files_only=True)
        if explicit and directory == Path(explicit).expanduser():
            _log.warning("tokenizer folder %s has no vocab.json + merges.txt", directory)
    return None


def tokenize(tokenizer, texts: list[str]) -> dict:
    """Token ids and mask for a batch, padded only to its longest text.

    laion-clap pads every text to 77 tokens; RoBERTa masks padding and CLAP
    pools the first token, so padding to the longest text gives the same
    embedding at a fraction of the cost for short prompts.
    """
    return tokenizer(
        texts, padding="longest", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
    )
