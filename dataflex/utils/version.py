"""The version of dataflex (the distribution dataflex-train); pyproject.toml reads it from here."""
__version__ = "0.2.0"
