"""MkDocs hook: docstrings write tensor shapes in brackets (`feats [N, d]`), which Markdown reads as
reference links and mkdocs-autorefs then reports as missing cross-references. A bracketed comma list is
never a Python identifier, so those reports (and only those) are dropped; every other warning, in the
pages or the docstrings, still fails `mkdocs build --strict`."""
import logging
import re

_SHAPE = re.compile(r"Could not find cross-reference target '[^']*,[^']*'$")


class _DropShapes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _SHAPE.search(record.getMessage())


def on_config(config):
    # autorefs logs through a child of "mkdocs.plugins": a filter on a logger sees only its own records,
    # so filter the handlers of "mkdocs" (the console and, in a build, strict mode's warning counter,
    # which is in place by the time on_config runs)
    for handler in logging.getLogger("mkdocs").handlers:
        if not any(isinstance(f, _DropShapes) for f in handler.filters):
            handler.addFilter(_DropShapes())
    return config
