"""The CLAP network, its weights and its forwards; knows nothing of sockets, queues or search.

* :mod:`~clap_ws.model.clap` - :class:`ClapModel`: device, precision, chunks, compile, engine;
* :mod:`~clap_ws.model.checkpoint` - reading laion-clap checkpoints and telling their architecture;
* :mod:`~clap_ws.model.weights` - finding or fetching checkpoints, and :func:`load_model`;
* :mod:`~clap_ws.model.laion` - laion-clap's network, imported without its side effects;
* :mod:`~clap_ws.model.towers`, :mod:`~clap_ws.model.swin`, :mod:`~clap_ws.model.roberta` - the towers'
  inference forwards;
* :mod:`~clap_ws.model.openvino_audio` - the optional OpenVINO audio engine;
* :mod:`~clap_ws.model.tokenizer` - RoBERTa's tokenizer, found offline.
"""

from .clap import (
    ENGINES,
    PRECISIONS,
    ClapModel,
    model_identity,
    resolve_device,
    resolve_precision,
)

__all__ = ["ENGINES", "PRECISIONS", "ClapModel", "model_identity", "resolve_device", "resolve_precision"]
