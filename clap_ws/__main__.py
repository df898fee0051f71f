"""``python -m clap_ws`` is the ``clap-ws`` command."""

from .cli import main

raise SystemExit(main())
