"""Gopher-style heuristic quality filter: symbol, digit and alphabetic ratios, word length, line shapes.

After Rae et al. 2021 (Gopher, appendix A), with thresholds loosened by default so code and math pass;
each check can be switched off with ``null``.
"""
from __future__ import annotations

from dataprep.document import Document
from dataprep.steps.base import FilterStep

_BULLETS = ("•", "*", "-", "–", "‣", "▪", "●")


class QualityFilter(FilterStep):
    """Heuristic quality checks. Reasons (first failing check wins, in this order):

    * ``symbol_ratio``: (``#`` + ``...``/``…`` occurrences) / words > ``max_symbol_word_ratio``
    * ``digit_ratio``: digits / characters > ``max_digit_ratio``
    * ``non_alnum_ratio``: characters that are neither alphanumeric nor whitespace / characters
      > ``max_non_alnum_ratio``
    * ``alpha_words``: share of words holding an alphabetic character < ``min_alpha_words_ratio``
    * ``mean_word_length``: mean word length outside [``min_mean_word_length``, ``max_mean_word_length``]
    * ``bullet_lines``: share of lines starting with a bullet > ``max_bullet_lines_ratio``
    * ``ellipsis_lines``: share of lines ending with an ellipsis > ``max_ellipsis_lines_ratio``
    * ``vowelless_words``: share of alphabetic words of 3+ letters without a vowel (a-e-i-o-u-y)
      > ``max_vowelless_words_ratio`` (catches random character strings)
    """

    name = "quality_filter"

    def __init__(self, max_symbol_word_ratio: float | None = 0.1, max_digit_ratio: float | None = 0.5,
                 max_non_alnum_ratio: float | None = 0.5, min_alpha_words_ratio: float | None = 0.5,
                 min_mean_word_length: float | None = 2.0, max_mean_word_length: float | None = 12.0,
                 max_bullet_lines_ratio: float | None = 0.9, max_ellipsis_lines_ratio: float | None = 0.3,
                 max_vowelless_words_ratio: float | None = 0.3, domains=None):
        super().__init__(domains=domains, max_symbol_word_ratio=max_symbol_word_ratio,
                         max_digit_ratio=max_digit_ratio, max_non_alnum_ratio=max_non_alnum_ratio,
                         min_alpha_words_ratio=min_alpha_words_ratio, min_mean_word_length=min_mean_word_length,
                         max_mean_word_length=max_mean_word_length, max_bullet_lines_ratio=max_bullet_lines_ratio,
                         max_ellipsis_lines_ratio=max_ellipsis_lines_ratio,
                         max_vowelless_words_ratio=max_vowelless_words_ratio)
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_digit_ratio = max_digit_ratio
        self.max_non_alnum_ratio = max_non_alnum_ratio
        self.min_alpha_words_ratio = min_alpha_words_ratio
        self.min_mean_word_length = min_mean_word_length
        self.max_mean_word_length = max_mean_word_length
        self.max_bullet_lines_ratio = max_bullet_lines_ratio
        self.max_ellipsis_lines_ratio = max_ellipsis_lines_ratio
        self.max_vowelless_words_ratio = max_vowelless_words_ratio

    def check(self, doc: Document) -> str | None:
        text = doc.text
        n_chars = len(text)
        if n_chars == 0:
            return "empty"
        words = text.split()
        n_words = max(len(words), 1)
        if self.max_symbol_word_ratio is not None:
            sym = text.count("#") + text.count("...") + text.count("…")
            if sym / n_words > self.max_symbol_word_ratio:
                return "symbol_ratio"
        if self.max_digit_ratio is not None:
            digits = sum(c.isdigit() for c in text) if not text.isalpha() else 0
            if digits / n_chars > self.max_digit_ratio:
                return "digit_ratio"
        if self.max_non_alnum_ratio is not None:
            non_space = n_chars - sum(len(w) for w in words)  # whitespace characters
            alnum = sum(c.isalnum() for c in text)
            if (n_chars - alnum - non_space) / n_chars > self.max_non_alnum_ratio:
                return "non_alnum_ratio"
        alpha_words = [w for w in words if any(c.isalpha() for c in w)]
        if self.min_alpha_words_ratio is not None and len(alpha_words) / n_words < self.min_alpha_words_ratio:
            return "alpha_words"
        if self.min_mean_word_length is not None or self.max_mean_word_length is not None:
            mean = sum(len(w) for w in words) / n_words
            if self.min_mean_word_length is not None and mean < self.min_mean_word_length:
                return "mean_word_length"
            if self.max_mean_word_length is not None and mean > self.max_mean_word_length:
                return "mean_word_length"
        if self.max_bullet_lines_ratio is not None or self.max_ellipsis_lines_ratio is not None:
            lines = [ln for ln in text.split("\n") if ln.strip()]
            n_lines = max(len(lines), 1)
            if self.max_bullet_lines_ratio is not None:
                bullets = sum(ln.lstrip().startswith(_BULLETS) for ln in lines)
                if bullets / n_lines > self.max_bullet_lines_ratio:
                    return "bullet_lines"
            if self.max_ellipsis_lines_ratio is not None:
                ell = sum(ln.rstrip().endswith(("...", "…")) for ln in lines)
                if ell / n_lines > self.max_ellipsis_lines_ratio:
                    return "ellipsis_lines"
        if self.max_vowelless_words_ratio is not None:
            letters = ["".join(c for c in w if c.isalpha()) for w in alpha_words]
            letters = [w.lower() for w in letters if len(w) >= 3]
            if letters:
                vowelless = sum(not any(v in w for v in "aeiouy") for w in letters)
                if vowelless / len(letters) > self.max_vowelless_words_ratio:
                    return "vowelless_words"
        return None
