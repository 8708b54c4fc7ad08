"""``python -m loracompress`` runs the CLI (also under ``accelerate launch -m loracompress``)."""

import sys

from loracompress_cli.app import main

sys.exit(main())
