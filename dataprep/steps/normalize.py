"""Unicode and whitespace normalisation (a map step)."""
from __future__ import annotations

import re
import unicodedata

from dataprep.document import Document
from dataprep.steps.base import Step

# Control characters except tab and newline, zero-width characters, BOM, soft hyphen.
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200d\u2060\ufeff]")
_ODD_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+$", re.M)
_INNER_SPACES = re.compile(r"(?<=\S) {2,}")


class Normalize(Step):
    """Normalise Unicode and whitespace without breaking code indentation.

    Args:
        form: Unicode normal form (``NFC``, ``NFKC``, ...) or ``null`` to skip.
        remove_invisible: drop control, zero-width and BOM characters.
        unify_spaces: map exotic spaces (NBSP, thin space, ...) to a plain space.
        newlines: turn ``\\r\\n`` and ``\\r`` into ``\\n``.
        strip_trailing: strip spaces and tabs at line ends.
        max_blank_lines: collapse longer runs of blank lines to this many.
        collapse_inner_spaces: squeeze runs of spaces after a non-space (off: it breaks code alignment).
        strip: strip the whole document.
    """

    name = "normalize"

    def __init__(self, form: str | None = "NFC", remove_invisible: bool = True, unify_spaces: bool = True,
                 newlines: bool = True, strip_trailing: bool = True, max_blank_lines: int = 2,
                 collapse_inner_spaces: bool = False, strip: bool = True, domains=None):
        super().__init__(domains=domains, form=form, remove_invisible=remove_invisible,
                         unify_spaces=unify_spaces, newlines=newlines, strip_trailing=strip_trailing,
                         max_blank_lines=max_blank_lines, collapse_inner_spaces=collapse_inner_spaces,
                         strip=strip)
        self.form = form
        self.remove_invisible = remove_invisible
        self.unify_spaces = unify_spaces
        self.newlines = newlines
        self.strip_trailing = strip_trailing
        self.blank_repl = "\n" * (max_blank_lines + 1) if max_blank_lines is not None else ""
        self.max_blank_lines = max_blank_lines
        self._blanks = re.compile(r"\n{%d,}" % (max_blank_lines + 2)) if max_blank_lines is not None else None
        self.collapse_inner_spaces = collapse_inner_spaces
        self.strip = strip

    def normalize(self, text: str) -> str:
        if self.form and not text.isascii():
            text = unicodedata.normalize(self.form, text)
        if self.newlines and "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.remove_invisible:
            text = _INVISIBLE.sub("", text)
        if self.unify_spaces and not text.isascii():
            text = _ODD_SPACES.sub(" ", text)
        if self.strip_trailing:
            text = _TRAILING.sub("", text)
        if self._blanks is not None and "\n\n\n" in text:
            text = self._blanks.sub(self.blank_repl, text)
        if self.collapse_inner_spaces:
            text = _INNER_SPACES.sub(" ", text)
        if self.strip:
            text = text.strip()
        return text

    def process(self, doc: Document) -> Document:
        doc.text = self.normalize(doc.text)
        return doc
