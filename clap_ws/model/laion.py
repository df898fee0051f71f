"""Import laion-clap's model code without its import-time side effects.

clap-ws runs LAION-CLAP's own architecture (``laion_clap/clap_module``) so
that published checkpoints load unchanged. The package cannot be imported
the ordinary way, because ``import laion_clap``:

* downloads three tokenizers from a model hub at import time
  (``training/data.py``);
* imports torchvision, which is absent or broken on CPU-only torch installs
  (``clap_module/utils.py`` and ``clap_module/transform.py``);

and ``CLAP(...)`` downloads roberta-base weights in its constructor, although
every checkpoint carries them.

So this module loads only the submodules the model needs (``model``,
``htsat``, ``feature_fusion``, ``utils``, ...) from the installed package's
directory under a private package name, never running either ``__init__``.
While they import, a placeholder stands in for ``torchvision.ops.misc`` if the
real one cannot be imported (it is used only for freezing batch-norm layers in
training). In this private copy, the text tower is built from roberta-base's
configuration with no download.

Nothing here is cached at module level: :func:`load_clap_module` returns the
module object, and Python's import system keeps it for later calls.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path

PRIVATE_PACKAGE = "clap_ws._laion_clap_module"

#: roberta-base's published configuration (the text tower of every
#: LAION-CLAP checkpoint). Written out so that no download is needed.
ROBERTA_BASE_CONFIG = dict(
    vocab_size=50265,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=514,
    type_vocab_size=1,
    initializer_range=0.02,
    layer_norm_eps=1e-05,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)


class LaionClapMissing(ImportError):
    """laion-clap is not installed."""


def _laion_clap_dir() -> Path:
    spec = importlib.util.find_spec("laion_clap")  # locates, does not import
    if spec is None or spec.origin is None:
        raise LaionClapMissing(
            "the laion-clap package is not installed; `pip install laion-clap` "
            "(clap-ws uses its model code, never its import-time downloads)"
        )
    return Path(spec.origin).parent / "clap_module"


@contextlib.contextmanager
def _torchvision_placeholder() -> Iterator[None]:
    """Provide ``torchvision.ops.misc.FrozenBatchNorm2d`` only if the real one fails."""
    try:
        import torchvision.ops.misc  # noqa: F401
    except Exception:  # absent, or present but broken against this torch
        pass
    else:
        yield
        return
    import torch

    names = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
    saved = {name: sys.modules.get(name) for name in names}
    tv, ops, misc = (types.ModuleType(name) for name in names)

    class FrozenBatchNorm2d(torch.nn.Module):
        """Placeholder: laion-clap uses it only to freeze layers for training."""

    misc.FrozenBatchNorm2d = FrozenBatchNorm2d
    tv.ops, ops.misc = ops, misc
    sys.modules.update(dict(zip(names, (tv, ops, misc))))
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _OfflineRoberta:
    """Stands in for ``transformers.RobertaModel`` inside laion-clap's model.py.

    ``from_pretrained('roberta-base')`` builds the same architecture from its
    configuration with random weights; the checkpoint then fills them in.
    """

    @staticmethod
    def from_pretrained(name: str, *args, **kwargs):
        from transformers import RobertaConfig, RobertaModel

        if name != "roberta-base":
            raise ValueError(f"clap-ws only knows roberta-base's configuration, not {name!r}")
        return RobertaModel(RobertaConfig(**ROBERTA_BASE_CONFIG))


def load_clap_module() -> types.ModuleType:
    """Return laion-clap's ``clap_module.model`` module, imported side-effect free."""
    model_name = PRIVATE_PACKAGE + ".model"
    if model_name in sys.modules:
        return sys.modules[model_name]
    package = types.ModuleType(PRIVATE_PACKAGE)
    package.__path__ = [str(_laion_clap_dir())]
    package.__package__ = PRIVATE_PACKAGE
    sys.modules[PRIVATE_PACKAGE] = package
    # Import what model.py takes from transformers before the placeholder exists:
    # transformers probes for torchvision while it loads (when Pillow is
    # installed) and must see the truth, not the placeholder.
    from transformers import BartModel, BertModel, RobertaModel  # noqa: F401
    from transformers.tokenization_utils_base import BatchEncoding  # noqa: F401

    try:
        with _torchvision_placeholder():
            model = importlib.import_module(model_name)
    except BaseException:
        sys.modules.pop(PRIVATE_PACKAGE, None)
        raise
    model.RobertaModel = _OfflineRoberta  # only this private copy is changed
    return model


def model_config(audio_model: str) -> dict:
    """laion-clap's JSON configuration for ``audio_model`` (e.g. ``"HTSAT-tiny"``)."""
    import json

    path = _laion_clap_dir() / "model_configs" / f"{audio_model}.json"
    return json.loads(path.read_text())
