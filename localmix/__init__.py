"""localmix: run Mistral and Mixtral locally, quantized, fast."""

__version__ = "0.1.0"
