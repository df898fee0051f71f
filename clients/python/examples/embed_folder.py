"""Embed every sound file in a folder into one numpy array: python embed_folder.py FOLDER [URL] (needs soundfile)."""

import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from clap_ws_client import ClapClient

folder, url = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ws://127.0.0.1:32051/clap"
paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".wav", ".flac", ".ogg", ".aiff", ".mp3"})
with ClapClient(url) as client:
    embeddings = np.stack([client.embed(*sf.read(p, dtype="float32")).embedding for p in paths])
np.savez(folder / "embeddings.npz", embeddings=embeddings, paths=[str(p) for p in paths])
print(f"{len(paths)} sounds -> {folder / 'embeddings.npz'} {embeddings.shape}")
