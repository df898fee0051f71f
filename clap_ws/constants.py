"""What every layer agrees on: CLAP's input rate, its window and its embedding width.

One definition, so that the audio path, the model and search cannot drift
apart; laion-clap's published checkpoints fix all three.
"""

SAMPLE_RATE = 48_000  # Hz: the rate CLAP's spectrogram front end was trained at
WINDOW_SECONDS = 10
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_SECONDS  # what the audio encoder sees per call
EMBED_DIM = 512  # both towers project into this shared space
