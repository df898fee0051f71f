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
roberta-base's special-token ids, a byte-level alphabet and BPE merges learnt
in memory (deterministically, in milliseconds) from a few hundred words that
describe sounds, so prompts split into about as many tokens as roberta-base
makes of them ("a warm bell": 5 tokens; bytes alone made 13, which
overstated text latency for untrained models). Its ids are valid for
the model, so text paths are testable offline; like the untrained weights,
its output means nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

MAX_TOKENS = 77  # CLAP's text context length
_log = logging.getLogger(__name__)


# What sound prompts are made of; every word here becomes one token.
_WORDS = """
a an the of with and in on at to from by for like sound sounds noise tone note chord
bright dark warm cold soft loud hard harsh smooth rough clean dirty distorted metallic wooden glassy
airy breathy deep low high thin thick fat sharp dull hollow resonant muted noisy pure rich sweet
short long slow fast sustained decaying rising falling sweeping pulsing rhythmic steady evolving
bell drum kick snare hat cymbal clap gong piano organ guitar bass string strings violin cello flute
horn brass trumpet synth pad lead pluck arp chime choir voice vocal whistle buzz hum drone click
pop crack crash hit thud boom rumble hiss whoosh sweep glitch beep chirp squeak scream growl
bird birds dog water rain wind thunder fire engine car train door footsteps speech music crowd
electronic acoustic analog digital ambient cinematic industrial natural mechanical musical
one two three small large big little heavy light very slightly
""".split()


def byte_level_tokenizer():
    """A RoBERTa-compatible tokenizer that needs no files (for ``--untrained``)."""
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(_WORDS[i : i + 8]) for i in range(0, len(_WORDS), 8)] + _WORDS  # with and without a space
    bpe.train_from_iterator(corpus * 2, vocab_size=4096, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return RobertaTokenizer(vocab=model["vocab"], merges=merges)


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


def tokenize(tokenizer, texts: list[str], max_tokens: int = MAX_TOKENS) -> dict:
    """Token ids and mask for a batch, padded only to its longest text, each cut at ``max_tokens``.

    laion-clap pads every text to 77 tokens; RoBERTa masks padding and CLAP
    pools the first token, so padding to the longest text gives the same
    embedding at a fraction of the cost for short prompts.
    """
    return tokenizer(
        texts, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt"
    )
