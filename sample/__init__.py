"""Command line for generating images: `python -m sample --help`."""
