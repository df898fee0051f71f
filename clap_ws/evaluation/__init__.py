"""``clap-ws evaluate``: how well a model classifies and retrieves the sounds of a labelled library.

:mod:`.labels` reads classes and captions, :mod:`.metrics` the field's
ranking figures with intervals and chance, :mod:`.classify` the three
classifiers, :mod:`.run` puts them together, :mod:`.report` writes the files.
"""

from .report import write
from .run import DEFAULT_PROMPT, evaluate

__all__ = ["DEFAULT_PROMPT", "evaluate", "write"]
