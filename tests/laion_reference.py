"""Reference embeddings from laion-clap's own ``CLAP_Module``, for the parity test.

Run as a separate process (it must patch what ``import laion_clap`` would
otherwise fetch or import), so nothing here leaks into the test process:

    python tests/laion_reference.py CKPT AMODEL CLIPS.npz TEXTS.json OUT.npz

It loads CKPT with laion-clap's ``load_ckpt`` and embeds with
``get_audio_embedding_from_data`` and ``get_text_embedding`` - laion-clap's own
code paths, unchanged. Three things are supplied from outside because this
machine cannot provide them: torchvision (imported at module level by
laion-clap's training code, like PIL; placeholders with the names it imports), the
tokenizers it downloads at import time (clap-ws's offline byte-level one), and
roberta-base's weights (the architecture from its configuration; the
checkpoint then overwrites every weight).
"""

import json
import sys
import types

import numpy as np
import torch


def placeholder_torchvision():
    names = ["torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.ops",
             "torchvision.ops.misc", "PIL", "PIL.Image"]
    mods = {n: types.ModuleType(n) for n in names}
    for attr in ["Normalize", "Compose", "RandomResizedCrop", "InterpolationMode", "ToTensor", "Resize",
                 "CenterCrop"]:
        setattr(mods["torchvision.transforms"], attr, type(attr, (), {}))
    mods["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    mods["torchvision"].datasets = mods["torchvision.datasets"]
    mods["torchvision"].transforms = mods["torchvision.transforms"]
    mods["torchvision"].ops = mods["torchvision.ops"]
    mods["torchvision.ops"].misc = mods["torchvision.ops.misc"]
    mods["PIL"].Image = mods["PIL.Image"]  # image datasets only
    sys.modules.update(mods)


def offline_transformers():
    import transformers

    from clap_ws.model.laion import ROBERTA_BASE_CONFIG
    from clap_ws.model.tokenizer import byte_level_tokenizer

    tokenizer = classmethod(lambda cls, *a, **k: byte_level_tokenizer())
    for name in ("BertTokenizer", "RobertaTokenizer", "BartTokenizer"):
        getattr(transformers, name).from_pretrained = tokenizer
    transformers.RobertaModel.from_pretrained = classmethod(
        lambda cls, *a, **k: cls(transformers.RobertaConfig(**ROBERTA_BASE_CONFIG)))


def main(ckpt, amodel, clips_path, texts_path, out_path):
    offline_transformers()  # first: transformers must see the real (absent) PIL
    placeholder_torchvision()
    import laion_clap

    module = laion_clap.CLAP_Module(enable_fusion=False, amodel=amodel, device="cpu")
    module.load_ckpt(ckpt, verbose=False)
    clips = np.load(clips_path)
    audio = module.get_audio_embedding_from_data([clips[k] for k in sorted(clips.files)])
    with torch.no_grad():
        text = module.get_text_embedding(json.load(open(texts_path)))
    np.savez(out_path, audio=audio, text=text)


if __name__ == "__main__":
    main(*sys.argv[1:])
