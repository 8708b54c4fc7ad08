"""The ``loracompress`` command line (installed as package ``loracompress_cli``).

The command line runs offline: set before transformers and huggingface_hub are imported (the hub
reads it once, at import), so no request is made even for an id that is not in the local cache.
The library itself sets no environment variable; it passes ``local_files_only=True`` on every load.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
