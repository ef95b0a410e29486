"""``python -m medseg_lightning.cli``: what the ``medseg`` script runs (child processes of studies use it)."""

from medseg_lightning.cli.main import main

raise SystemExit(main())
