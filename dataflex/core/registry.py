"""Name -> class lookup for each plugin family, with errors that list what exists."""
from __future__ import annotations


class Registry(dict):
    def __init__(self, family: str, entries: dict):
        super().__init__(entries)
        self.family = family

    def get_class(self, name: str):
        if name not in self:
            raise ValueError(f"unknown {self.family} {name!r}; available {self.family}s: {', '.join(sorted(self))}")
        return self[name]

    def build(self, name: str, **kwargs):
        return self.get_class(name)(**kwargs)
