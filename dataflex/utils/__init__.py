"""Leaves that every layer may use: process groups (`dist`), the one-line user errors (`errors`), console
logging (`console`) and file locks (`files`). Nothing here imports another part of dataflex."""
