"""Where model weights come from: a path, the cache, or (only when asked) a download.

Resolution, first match wins:

1. ``--model ORG/NAME`` or ``CLAP_MODEL``: a transformers CLAP repository in
   the local Hugging Face cache (``HF_HOME``, ``HF_HUB_CACHE``), looked up
   offline (:func:`~clap_ws.model.transformers_folder.hub_snapshot`);
2. ``--checkpoint PATH`` or ``CLAP_CHECKPOINT_PATH`` (a LAION ``.pt`` file or
   a transformers folder, or a bare file name looked up in the cache directory);
3. ``<cache>/630k-audioset-best.pt``, the cache being ``--cache-dir``,
   ``CLAP_WS_CACHE_DIR`` or ``~/.cache/clap-ws``.

If nothing is found clap-ws fails at once with a message that names the file,
the variable and the command that fetches it. It never downloads unless told
to (``clap-ws download`` or ``serve --download``), and then makes one attempt
with a short timeout and a progress bar: no multi-minute retry loops. The
roberta-base tokenizer files are fetched alongside, since text needs them.

:func:`load_model` is the single way the CLI and the Python API get a model.
"""

from __future__ import annotations

import functools
import logging
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .transformers_folder import hub_snapshot, is_transformers_folder

DEFAULT_CHECKPOINT = "630k-audioset-best.pt"
KNOWN_CHECKPOINTS = {
    "630k-audioset-best.pt": "HTSAT-tiny, general audio (laion-clap's default)",
    "630k-best.pt": "HTSAT-tiny, general audio",
    "630k-audioset-fusion-best.pt": "HTSAT-tiny + fusion",
    "630k-fusion-best.pt": "HTSAT-tiny + fusion",
    "music_audioset_epoch_15_esc_90.14.pt": "HTSAT-base, music",
    "music_speech_audioset_epoch_15_esc_89.98.pt": "HTSAT-base, music and speech",
}
CHECKPOINT_URL = "https://huggingface.co/lukewys/laion_clap/resolve/main/"
TOKENIZER_URL = "https://huggingface.co/FacebookAI/roberta-base/resolve/main/"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
_log = logging.getLogger(__name__)


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    value = explicit or os.environ.get("CLAP_WS_CACHE_DIR") or "~/.cache/clap-ws"
    return Path(value).expanduser()


def find_checkpoint(checkpoint: str | os.PathLike | None, cache: Path) -> Path | None:
    """The checkpoint file to load, or None if none is given or cached."""
    value = checkpoint or os.environ.get("CLAP_CHECKPOINT_PATH")
    if value:
        path = Path(value).expanduser()
        if path.is_file() or is_transformers_folder(path):
            return path
        if path.is_dir():
            raise ModelError(f"{path} is a folder without config.json: not a transformers CLAP model "
                             f"(a LAION checkpoint is a .pt file)")
        if path.name == str(value) and (cache / path.name).is_file():
            return cache / path.name
        raise ModelError(
            f"checkpoint {value} not found (looked at {path} and {cache / path.name}); "
            f"fetch a published one with "
            f"`clap-ws download {path.name if path.name in KNOWN_CHECKPOINTS else DEFAULT_CHECKPOINT}`, "
            f"or try things without weights with --untrained (random weights: tests and latency work only)"
        )
    default = cache / DEFAULT_CHECKPOINT
    return default if default.is_file() else None


def missing_checkpoint_message(cache: Path) -> str:
    return (
        f"no model checkpoint: {cache / DEFAULT_CHECKPOINT} does not exist and neither "
        f"--checkpoint nor CLAP_CHECKPOINT_PATH is set. Fetch it with "
        f"`clap-ws download {DEFAULT_CHECKPOINT}` (or `clap-ws serve --download`), point "
        f"CLAP_CHECKPOINT_PATH at a LAION-CLAP .pt file, or run with --untrained for random "
        f"weights (tests and latency work only)"
    )


def fetch(url: str, dest: Path, timeout: float = 15.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` atomically: one attempt, ``timeout`` per socket wait."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        os.replace(part, dest)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        raise ModelError(f"download of {url} failed ({exc}); nothing was retried. "
                         f"Check the network, or fetch the file yourself to {dest}") from None
    return dest


def download(name: str = DEFAULT_CHECKPOINT, cache: Path | None = None, *, base_url: str | None = None,
             tokenizer_url: str | None = None, timeout: float = 15.0, progress: bool = True) -> Path:
    """Fetch a published checkpoint and the roberta-base tokenizer files into ``cache``; or, for ``ORG/NAME``,
    a transformers CLAP repository into the Hugging Face cache."""
    if "/" in name:
        return hub_snapshot(name, download=True)
    cache = cache or cache_dir()
    if name not in KNOWN_CHECKPOINTS:
        _log.warning("%s is not one of the known LAION-CLAP checkpoints (%s)", name, ", ".join(KNOWN_CHECKPOINTS))
    base = base_url or os.environ.get("CLAP_WS_CHECKPOINT_URL") or CHECKPOINT_URL
    target = cache / name
    if not target.is_file():
        fetch(base.rstrip("/") + "/" + name, target, timeout, progress)
    download_tokenizer(cache, base_url=tokenizer_url, timeout=timeout, progress=progress)
    return target


def download_tokenizer(cache: Path, *, base_url: str | None = None, timeout: float = 15.0,
                       progress: bool = True) -> Path:
    base = base_url or os.environ.get("CLAP_WS_TOKENIZER_URL") or TOKENIZER_URL
    folder = cache / "roberta-base"
    for filename in TOKENIZER_FILES:
        if not (folder / filename).is_file():
            fetch(base.rstrip("/") + "/" + filename, folder / filename, timeout, progress)
    return folder


def _on_a_thread_that_ends(build):
    """Run ``build`` on a short-lived thread; its result or exception comes back to the caller.

    Building a model runs torch ops, and the first torch op on a thread gives
    that thread its own OpenMP pool; libgomp keeps a pool until its thread
    ends, and with more pooled threads than cores it stops spinning between
    parallel regions and sleeps instead, which made every model call from the
    server's worker thread markedly slower (``docs/experiments.md``). Built
    this way, the pool that runs the model is the process's only one.
    """
    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with ThreadPoolExecutor(1, thread_name_prefix="clap-model-build") as pool:
            return pool.submit(build, *args, **kwargs).result()

    return wrapper


@_on_a_thread_that_ends
def load_model(checkpoint: str | os.PathLike | None = None, *, untrained: bool = False, seed: int = 0,
               audio_model: str = "HTSAT-tiny", device: str | None = None, precision: str = "auto",
               chunk: int = 0, compile: bool = False, engine: str = "torch",
               cache: str | os.PathLike | None = None, tokenizer_dir: str | os.PathLike | None = None,
               allow_pickle: bool = False, download_missing: bool = False, repo_id: str | None = None):
    """Build the one model a process serves, from the options every subcommand shares.

    ``repo_id`` (``--model``, or ``CLAP_MODEL``) names a transformers repository in the local
    Hugging Face cache; ``download_missing`` fetches it, or the default
    checkpoint, when absent. It is built on a thread that ends (see
    :func:`_on_a_thread_that_ends`).
    """
    from .clap import ENGINES, resolve_device, resolve_precision

    folder = cache_dir(cache)
    repo = repo_id or (None if checkpoint or untrained else os.environ.get("CLAP_MODEL"))
    if sum(map(bool, (untrained, checkpoint, repo))) > 1:
        raise ModelError("--untrained, --checkpoint and --model exclude each other")
    if engine not in ("auto", *ENGINES):
        raise ModelError(f"unknown engine {engine!r}: one of auto, {', '.join(ENGINES)}")
    target = resolve_precision(precision, resolve_device(device))
    options: dict[str, Any] = dict(device=device, chunk=chunk, compile=compile, engine_cache=engine_cache_dir(folder))
    if engine == "torch":
        return _build(folder, checkpoint, repo, untrained, seed, audio_model, tokenizer_dir, allow_pickle,
                      download_missing, dict(options, precision=target))
    # OpenVINO exports from the fp32 weights, so it is built over an fp32 model before anything casts them
    reference = _build(folder, checkpoint, repo, untrained, seed, audio_model, tokenizer_dir, allow_pickle,
                       download_missing, dict(options, precision="fp32", pack=False))
    if engine == "openvino":
        return reference.variant(engine="openvino", precision=target, pack=True)
    from .engine_choice import choose_engine

    return choose_engine(reference, target)


def engine_cache_dir(cache: Path) -> Path:
    """Where OpenVINO's export and compiled code are kept: ``CLAP_WS_ENGINE_CACHE``, else ``<cache>/engines``."""
    return Path(os.environ.get("CLAP_WS_ENGINE_CACHE") or cache / "engines").expanduser()


def _build(folder: Path, checkpoint, repo: str | None, untrained: bool, seed: int, audio_model: str, tokenizer_dir,
           allow_pickle: bool, download_missing: bool, options: dict[str, Any]):
    """The model of :func:`load_model`: random weights, a Hugging Face repository, a transformers folder or a
    checkpoint; ``options`` go to the constructor."""
    from .checkpoint import Architecture
    from .clap import ClapModel
    from .tokenizer import find_tokenizer

    if untrained:
        return ClapModel.untrained(Architecture(audio_model), seed=seed, **options)
    if repo:
        try:
            snapshot = hub_snapshot(repo)
        except ModelError:
            if not download_missing:
                raise
            snapshot = hub_snapshot(repo, download=True)
        tokenizer = find_tokenizer(tokenizer_dir, folder) if tokenizer_dir else None
        return ClapModel.from_transformers(snapshot, name=repo, tokenizer=tokenizer, **options)
    path = find_checkpoint(checkpoint, folder)
    if path is not None and path.is_dir():  # a transformers folder brings its own tokenizer
        tokenizer = find_tokenizer(tokenizer_dir, folder) if tokenizer_dir else None
        return ClapModel.from_transformers(path, tokenizer=tokenizer, **options)
    if path is None:
        if not download_missing:
            raise ModelError(missing_checkpoint_message(folder))
        path = download(DEFAULT_CHECKPOINT, folder)
    elif download_missing:
        download_tokenizer(folder)
    tokenizer = find_tokenizer(tokenizer_dir, folder)
    source = "roberta-base (local files)" if tokenizer is not None else "none: text requests will fail"
    if tokenizer is None:
        _log.warning("roberta-base tokenizer files not found: text features are unavailable "
                     "(run `clap-ws download` or set CLAP_TOKENIZER_DIR); audio works")
    return ClapModel.from_checkpoint(path, tokenizer=tokenizer, tokenizer_source=source,
                                     allow_pickle=allow_pickle, **options)
