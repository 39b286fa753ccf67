"""A one-sheet .xlsx writer (an Office Open XML zip of five small XML parts), so vitune can write the
MMBench submission spreadsheet without a spreadsheet library.

Cells are numbers (int or float), strings (inline strings, whitespace kept) or None (an empty cell, which
pandas reads back as NaN, as it reads the ``None`` predictions of LLaVA's converter). Characters XML 1.0 cannot
hold (control characters other than tab, newline and carriage return) are dropped: openpyxl, which the
official converter writes through, refuses them outright.
"""

from __future__ import annotations

import io
import math
import re
import zipfile
from collections.abc import Sequence
from xml.sax.saxutils import escape

Cell = str | int | float | None

_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG_REL = "http://schemas.openxmlformats.org/package/2006/relationships"
_HEAD = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")

_PARTS = {
    "[Content_Types].xml": (
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/xl/workbook.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
        '<Override PartName="/xl/worksheets/sheet1.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
        '</Types>'),
    "_rels/.rels": (
        f'<Relationships xmlns="{_PKG_REL}"><Relationship Id="rId1" Type="{_REL}/officeDocument" '
        'Target="xl/workbook.xml"/></Relationships>'),
    "xl/_rels/workbook.xml.rels": (
        f'<Relationships xmlns="{_PKG_REL}"><Relationship Id="rId1" Type="{_REL}/worksheet" '
        'Target="worksheets/sheet1.xml"/></Relationships>'),
}


def column_name(index: int) -> str:
    """0 → A, 25 → Z, 26 → AA, ..."""
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = chr(ord("A") + rem) + name
    return name


def _cell(ref: str, value: Cell) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):  # a bool is an int to Python, not a number to a reader
        value = str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return ""  # NaN / inf have no number form in a cell: left empty, read back as NaN
    if isinstance(value, int | float):
        return f'<c r="{ref}"><v>{value!r}</v></c>'
    text = escape(_ILLEGAL.sub("", str(value)))
    return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{text}</t></is></c>'


def sheet_xml(rows: Sequence[Sequence[Cell]]) -> str:
    """The worksheet part: one ``<row>`` per row, cells referenced A1-style."""
    body = []
    for r, row in enumerate(rows, start=1):
        cells = "".join(_cell(f"{column_name(c)}{r}", v) for c, v in enumerate(row))
        body.append(f'<row r="{r}">{cells}</row>')
    return f'{_HEAD}<worksheet xmlns="{_MAIN}"><sheetData>{"".join(body)}</sheetData></worksheet>'


def workbook(rows: Sequence[Sequence[Cell]], sheet: str = "Sheet1") -> bytes:
    """The .xlsx bytes of one sheet holding ``rows`` (the first is usually the header)."""
    parts = {name: _HEAD + xml for name, xml in _PARTS.items()}
    name = escape(sheet, {'"': "&quot;"})
    parts["xl/workbook.xml"] = (f'{_HEAD}<workbook xmlns="{_MAIN}" xmlns:r="{_REL}"><sheets>'
                                f'<sheet name="{name}" sheetId="1" r:id="rId1"/></sheets></workbook>')
    parts["xl/worksheets/sheet1.xml"] = sheet_xml(rows)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, xml in parts.items():
            z.writestr(name, xml.encode("utf-8"))
    return buf.getvalue()
