"""MAP-Elites with pyribs, scored by a clap-ws server: measures from its behaviour descriptors, fitness = novelty.

    pip install ./clients/python ribs
    clap-ws serve --untrained &            # or a real checkpoint: descriptors then mean something
    python clients/python/examples/map_elites.py --url ws://127.0.0.1:32051/clap-bd --iterations 20

Each solution is four synthesis parameters (pitch, noise, decay, brightness); each sound is rendered here, sent
to the server on ``/clap-bd``, and comes back with its behaviour descriptor (2 dimensions, a projection the
server fits on the run's own archive) and its novelty against that archive (to which it is then added). The
run ends by printing the grid's coverage. With ``--untrained`` the server's embeddings are random functions of
the sound: the loop runs end to end, the map means nothing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from clap_ws_client import ClapClient
from ribs.archives import GridArchive
from ribs.emitters import GaussianEmitter
from ribs.schedulers import Scheduler

RATE = 48_000


def render(params: np.ndarray, seconds: float = 0.5, seed: int = 0) -> np.ndarray:
    """A plucked, noisy, filtered tone from four parameters in [0, 1]."""
    pitch, noisiness, decay, brightness = np.clip(params, 0, 1)
    t = np.arange(int(RATE * seconds)) / RATE
    freq = 55 * 2 ** (6 * pitch)
    tone = sum((brightness ** k) * np.sin(2 * np.pi * freq * (k + 1) * t) for k in range(6))
    noise = np.random.default_rng(seed).standard_normal(len(t))
    sound = ((1 - noisiness) * tone + noisiness * noise) * np.exp(-t * (1 + 20 * decay))
    return (0.5 * sound / (np.abs(sound).max() + 1e-9)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:32051/clap-bd")
    parser.add_argument("--token")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--archive", default=f"map-elites-{int(time.time())}")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with ClapClient(args.url, token=args.token, timeout=120) as client:
        seeds = rng.random((64, 4))  # a first population: the archive the projection is fitted on
        client.archive_add(args.archive, [render(s, seed=i) for i, s in enumerate(seeds)], audio=True)
        client.fit_projection(args.archive, method="pca", dims=2)
        for _ in range(600):
            if client.projection_info().get("installed"):
                break
            time.sleep(0.1)
        else:
            raise SystemExit("the server did not install the projection in 60 s")
        grid = GridArchive(solution_dim=4, dims=[12, 12], ranges=[(0.0, 1.0), (0.0, 1.0)])
        emitters = [GaussianEmitter(grid, sigma=0.15, x0=np.full(4, 0.5), batch_size=args.batch, seed=i)
                    for i in range(2)]
        scheduler = Scheduler(grid, emitters)
        for iteration in range(args.iterations):
            solutions = scheduler.ask()
            sounds = [render(s, seed=iteration * 1000 + i) for i, s in enumerate(solutions)]
            items = client.embed_batch_items(sounds, archive=args.archive, archive_add=True, k=10)
            measures = np.array([item.behavior_descriptor for item in items], dtype=np.float64)
            novelty = np.array([item.novelty if item.novelty is not None else 0.0 for item in items])
            scheduler.tell(novelty, measures)
            print(f"iteration {iteration + 1}: {len(grid)} elites, coverage {grid.stats.coverage:.3f}, "
                  f"best novelty {novelty.max():.3f}")
        print(f"coverage {grid.stats.coverage:.3f} of {grid.cells} cells; model {client.info()['model']}")
        client.archive_drop(args.archive)


if __name__ == "__main__":
    main()
