"""The ``loracompress`` command line (installed as package ``loracompress_cli``)."""
