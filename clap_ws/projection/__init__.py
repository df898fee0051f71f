"""Behaviour descriptors for quality-diversity runs: apply a projection (:mod:`.apply`), fit one
(:mod:`.fit`), and measure how well it keeps CLAP's neighbourhoods (:mod:`.quality`)."""

from .apply import Projection

__all__ = ["Projection"]
