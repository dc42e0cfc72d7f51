"""Neutralise user-derived text before it reaches a terminal, a spreadsheet or matplotlib.

Class names, file names and messages come from users' data. Three places interpret them:

- the terminal: ESC sequences recolour, move the cursor, retitle the window or write
  hyperlinks; BEL rings; C1 controls (U+0080-U+009F) act as ESC ``[`` on some terminals;
  bidi overrides (U+202A-U+202E, U+2066-U+2069) reorder what is shown, so ``\\u202eevil``
  reads backwards. :func:`terminal_text` shows each as a visible escape (``\\x1b``,
  ``\\u202e``) so the user sees the text was there without the terminal obeying it. rich
  markup (``[red]``) is a separate layer: :func:`rich_text` escapes both, for text printed
  through rich (every table and message of the CLI).
- a spreadsheet: a CSV cell starting with ``=``, ``+``, ``-``, ``@``, tab or carriage
  return is a formula in Excel / LibreOffice / Sheets (OWASP "CSV injection").
  :func:`csv_cell` prefixes such a cell with ``'`` (and neutralises control characters).
  ``--json`` output keeps the raw values: it is data, not a document.
- matplotlib: text with a pair of ``$`` is parsed as mathtext, and a malformed
  expression (``$\\x$``) raises while the figure is saved. :func:`plot_label` escapes ``$``.
- Markdown, and the HTML it becomes (``compare --md``, a model card): ``<a href=...>``,
  ``<script>``, ``[x](javascript:...)``, ``<javascript:...>`` autolinks and ``&#..;``
  entities would be live; ``|`` splits a table cell, a newline ends a row, a leading ``#``
  or ``-`` makes a heading or a list, backticks and ``*`` change the text.
  :func:`markdown_text` makes one line that renders as exactly the text given.

Pure Python, no imports beyond the standard library at import time: the CLI imports it at
start-up (``rich_text`` imports rich's markup escaping when first called).
"""

from __future__ import annotations

import re

__all__ = ["csv_cell", "markdown_text", "plot_label", "rich_text", "terminal_text"]

_BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
# C0 controls, DEL, C1 controls, bidi embeddings/overrides/isolates, and the invisible
# line/paragraph separators that also break a table row apart
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}\u2028\u2029]")
_UNSAFE_KEEP_NEWLINES = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}\u2028\u2029]")

# OWASP: cells starting with these are formulas (tab and CR too: some importers strip them)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

# Markdown: characters that are markup anywhere ('_' only at a word's edge: snake_case stays
# as it is, CommonMark never emphasises inside a word), and line starts that make a block
_MD_INLINE = re.compile(r"([\\`*~\[\]|]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z]))")
_MD_LINE_START = re.compile(r"^(\s*)(#|=|[-+](?=\s|$|-)|\d+(?=[.)](?:\s|$)))")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_text(value: object, keep_newlines: bool = False) -> str:
    """``str(value)`` with every control character, ESC sequence introducer and bidi
    override shown as a visible escape (``\\x1b``, ``\\x07``, ``\\u202e``).

    ``keep_newlines``: leave tab and newline as they are (multi-line messages); otherwise
    they are escaped too, so one value stays on one line (a table cell, a label).
    """
    text = str(value)
    pattern = _UNSAFE_KEEP_NEWLINES if keep_newlines else _UNSAFE
    return pattern.sub(_visible, text)


def rich_text(value: object, keep_newlines: bool = False) -> str:
    """:func:`terminal_text` with rich markup escaped too (``[red]`` shows as typed): user-derived
    text for a rich console or table."""
    from rich.markup import escape

    return escape(terminal_text(value, keep_newlines=keep_newlines))


def csv_cell(value: object) -> str:
    """A CSV cell that a spreadsheet shows as text, never evaluates.

    Control characters are escaped first (as :func:`terminal_text`, newlines included),
    then a cell that starts with a formula character gets a leading ``'``.
    Numbers formatted by the caller (``-0.5`` would not occur: probabilities are >= 0)
    should not be passed through here.
    """
    text = str(value)
    if text.startswith(_FORMULA_START):
        text = "'" + text
    return terminal_text(text)


def markdown_text(value: object) -> str:
    """One line of Markdown (a table cell, a heading, prose) that renders as the text itself.

    Control characters and newlines become visible escapes (:func:`terminal_text`), so the
    text stays on its line; ``&``, ``<`` and ``>`` become HTML entities, so no tag, autolink
    or entity is live; the inline markup characters (``\\ ` * ~ [ ] |`` and ``_`` at a
    word's edge) are backslash-escaped, so there is no link (``[x](javascript:...)``), code
    span, emphasis or extra table cell; a leading ``#``, ``=``, list marker (``- ``, ``+ ``,
    ``1. ``) or ``---`` is escaped so the line opens no heading, list or rule (numbers such
    as ``0.75`` or ``-0.5`` stay as they are).
    """
    text = terminal_text(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_INLINE.sub(r"\\\1", text)
    match = _MD_LINE_START.match(text)
    if match:
        mark = match.group(2)
        text = match.group(1) + (mark + "\\" if mark[0].isdigit() else "\\" + mark) + text[match.end():]
    return text


def plot_label(value: object) -> str:
    """Text matplotlib draws literally: ``$`` escaped so mathtext is never parsed,
    control characters made visible (the font has no glyph for them)."""
    text = terminal_text(value)
    return text.replace("$", r"\$")
