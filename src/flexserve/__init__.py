"""FlexServe: sell spare inference capacity as a flex service tier."""

__version__ = "0.1.0"
