"""``python -m deltameta`` runs the command line (also under ``accelerate launch -m``)."""

import sys

from deltameta.cli import main

sys.exit(main())
