r"""A griffe extension: the reST markup of torch_maml's docstrings, as Markdown.

torch_maml's docstrings are Google style (which mkdocstrings renders) with a few
pieces of reST that Markdown does not know. Before mkdocstrings parses them, this
extension rewrites, in every docstring of the package:

* cross-reference roles (``:class:`~torch_maml.Exact```, ``:func:`inner_lr_bound```,
  ``:meth:`step```...) into mkdocs-autorefs links, resolved as Sphinx resolves them
  (relative to the docstring's class and module first), when the target has a
  heading on the site; into inline code otherwise (``torch.Generator``, private
  helpers, names that do not exist);
* ``.. math::`` blocks and ``:math:`` roles into plain-text formulas (``\alpha`` ->
  ``α``, ``\frac{a}{b}`` -> ``a/b``, ``x^{2N}`` -> ``x^(2N)``...) in code blocks and
  code spans: they read the same with no JavaScript and no network;
* simple reST tables (columns ruled by ``===``) into Markdown tables;
* ``text::`` before a literal block into ``text:`` (the indented block is code);
* two-space list continuations into the four spaces Python-Markdown needs.

The package's source is not modified. References that do not resolve to a rendered
object are logged at debug level (``mkdocs build --verbose`` lists them) and
rendered as code, so a strict build does not fail on them.

Configured in ``mkdocs.yml``::

    extensions:
      - docs/_ext/rst_markup.py:RstMarkup:
          rendered: [torch_maml, torch_maml.theory, ...]

``rendered``: the modules whose public members the API pages render in full; the
package itself stands for the names of its ``__all__``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import griffe

__all__ = ["RstMarkup", "latex_to_text", "rst_to_markdown"]

# This module turns LaTeX into Greek letters and mathematical symbols on purpose.
# ruff: noqa: RUF001, RUF002, RUF003

_log = logging.getLogger("mkdocs.plugins.torch_maml_docs")

Resolver = Callable[[str, str], "str | None"]
"""``resolve(role, target) -> identifier to link to, or None for plain code``."""

_ROLE = re.compile(r":(?P<role>class|func|meth|mod|data|attr|exc|obj|const|math):`(?P<body>[^`]+)`")

_SYMBOLS = {
    "alpha": "α",
    "beta": "β",
    "gamma": "γ",
    "delta": "δ",
    "epsilon": "ε",
    "zeta": "ζ",
    "eta": "η",
    "theta": "θ",
    "lambda": "λ",
    "mu": "μ",
    "xi": "ξ",
    "pi": "π",
    "rho": "ρ",
    "sigma": "σ",
    "tau": "τ",
    "phi": "φ",
    "chi": "χ",
    "psi": "ψ",
    "omega": "ω",
    "Delta": "Δ",
    "nabla": "∇",
    "sum": "Σ",
    "prod": "∏",
    "cdots": "⋯",
    "dots": "…",
    "ldots": "…",
    "cdot": "·",
    "times": "×",
    "leftarrow": "←",
    "rightarrow": "→",
    "to": "→",
    "le": "≤",
    "leq": "≤",
    "ge": "≥",
    "geq": "≥",
    "neq": "≠",
    "approx": "≈",
    "in": "∈",
    "infty": "∞",
    "|": "‖",
    ",": " ",
    ";": " ",
    ":": " ",
    "!": "",
    "{": "{",
    "}": "}",
}
"""LaTeX commands without arguments, and their plain-text rendering."""

_GREEK = frozenset(
    name for name, symbol in _SYMBOLS.items() if "α" <= symbol <= "ω" or symbol == "Δ"
)

_RELATIONS = frozenset("←→≤≥≠≈∈")
"""Relation symbols: spaced, as LaTeX spaces them."""

_SIZING = frozenset({"big", "Big", "bigg", "Bigg", "left", "right"})
"""Delimiter sizing commands: dropped (the delimiter they size stays)."""

_FONTS = frozenset({"mathrm", "mathit", "mathbf", "text", "operatorname", "mathcal", "mathbb"})
"""Font commands: their argument is kept as it is (but ``\\mathcal L`` becomes ``ℒ``)."""

_CALLIGRAPHIC = {"L": "ℒ"}

_SPACE = "\x01"
"""A placeholder for a space of ``\\quad`` (2) or ``\\qquad`` (4): kept, not collapsed."""


def latex_to_text(latex: str) -> str:
    r"""A LaTeX formula in plain text: Unicode symbols, ``a/b``, ``x^(2N)``, ``x_{j+1}``.

    Only the commands torch_maml's docstrings use are known; others are kept as written.

    Example:
        >>> latex_to_text(r"\alpha < \frac{2^{1/(2N)} - 1}{L}")
        'α < (2^(1/(2N)) - 1)/L'
    """
    text = re.sub(" +", " ", "".join(_pieces(latex)))
    text = re.sub(f" ?({_SPACE}+) ?", lambda m: " " * len(m.group(1)), text)
    return text.strip()


def _pieces(latex: str) -> Iterator[str]:
    """The plain-text pieces of ``latex``, left to right."""
    i = 0
    previous = ""
    while i < len(latex):
        char = latex[i]
        if char == "\\":
            piece, i = _command(latex, i)
        elif char in "^_":
            argument, i = _argument(latex, i + 1)
            text = latex_to_text(argument)
            if char == "^" and text == "2" and previous == "∇":
                piece = "²"
            elif len(text) == 1:
                piece = char + text
            elif char == "^":
                piece = f"^{text}" if _group(text) else f"^({text})"
            else:
                piece = f"_{{{text}}}"
        elif char in "{}":  # grouping braces
            piece, i = "", i + 1
        else:
            piece, i = char, i + 1
        if piece:
            previous = piece
            yield piece


def _command(latex: str, start: int) -> tuple[str, int]:
    """The plain text of the command at ``latex[start]`` and its arguments; where it ends."""
    match = re.match(r"\\([A-Za-z]+|.)", latex[start:])
    if match is None:  # a lone backslash at the end
        return "\\", start + 1
    name, i = match.group(1), start + match.end()
    if name == "frac":
        numerator, i = _argument(latex, i)
        denominator, i = _argument(latex, i)
        top, bottom = latex_to_text(numerator), latex_to_text(denominator)
        top = top if _simple(top) else f"({top})"
        bottom = bottom if _simple(bottom) else f"({bottom})"
        spaced = i < len(latex) and latex[i] not in " ,;)}"  # "1/|B| Σ", not "1/|B|Σ"
        return f"{top}/{bottom}" + (" " if spaced else ""), i
    if name == "sqrt":
        argument, i = _argument(latex, i)
        return f"√({latex_to_text(argument)})", i
    if name == "hat":
        argument, i = _argument(latex, i)
        text = latex_to_text(argument)
        return (text + "\u0302" if len(text) == 1 else f"hat({text})"), i
    if name in _FONTS:
        argument, i = _argument(latex, i)
        text = latex_to_text(argument)
        return (_CALLIGRAPHIC.get(text, text) if name == "mathcal" else text), i
    if name in _SIZING:
        return "", i
    if name in ("quad", "qquad"):
        return _SPACE * (2 if name == "quad" else 4), i
    symbol = _SYMBOLS.get(name, match.group(0))
    if symbol in _RELATIONS:
        symbol = f" {symbol} "
    if name in _GREEK and re.match(r" +[A-Za-z]", latex[i:]):
        i = len(latex) - len(latex[i:].lstrip(" "))  # "\alpha L" reads "αL", a product
    return symbol, i


def _argument(text: str, start: int) -> tuple[str, int]:
    """The argument at ``text[start:]``: a ``{group}`` (braces removed) or one token."""
    while start < len(text) and text[start] == " ":
        start += 1
    if start >= len(text):
        return "", start
    if text[start] == "{":
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[start + 1 : end], end + 1
        return text[start + 1 :], len(text)
    if text[start] == "\\":
        match = re.match(r"\\([A-Za-z]+|.)", text[start:])
        end = start + (match.end() if match is not None else 1)
        return text[start:end], end
    return text[start], start + 1


def _simple(text: str) -> bool:
    """Whether ``text`` reads unambiguously beside ``/``: one term, or one group."""
    return re.fullmatch(r"[\w.∇]+|\|[^|]+\|", text) is not None or _group(text)


def _group(text: str) -> bool:
    """Whether ``text`` is one parenthesised group: ``(a(b))`` is, ``(a)(b)`` is not."""
    if not (text.startswith("(") and text.endswith(")")):
        return False
    depth = 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and index < len(text) - 1:
            return False
    return True


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _math_blocks(lines: list[str]) -> list[str]:
    r"""``.. math::`` directives as fenced plain-text blocks at the same indentation.

    A formula is one line, however its source lines break, and a new line at each
    ``\qquad`` (which separates formulas) or ``\\``.
    """
    result: list[str] = []
    i = 0
    while i < len(lines):
        match = re.match(r"^( *)\.\. math::\s*(.*)$", lines[i])
        if match is None:
            result.append(lines[i])
            i += 1
            continue
        pad, first = match.group(1), match.group(2).strip()
        i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(pad)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():  # trailing blank lines are not the formula's
            body.pop()
            i -= 1
        body = [line for line in body if line.strip()]
        common = min((_indent(line) for line in body), default=0)
        formula = ([first] if first else []) + [line[common:].rstrip() for line in body]
        if result and result[-1].strip():
            result.append("")
        result.append(f"{pad}```text")
        parts = re.split(r"\\qquad|\\\\", " ".join(formula))
        result += [f"{pad}{latex_to_text(part)}" for part in parts if part.strip()]
        result.append(f"{pad}```")
        if i < len(lines) and lines[i].strip():
            result.append("")
    return result


def _tables(lines: list[str]) -> list[str]:
    """Simple reST tables (``===  ===`` rules above, under the header, below) as pipe tables."""
    rule = re.compile(r"^ *=+( +=+)+ *$")
    result: list[str] = []
    i = 0
    while i < len(lines):
        if not rule.match(lines[i]):
            result.append(lines[i])
            i += 1
            continue
        border = lines[i]
        starts = [m.start() for m in re.finditer(r"=+", border)]
        sections: list[list[list[str]]] = [[], []]  # header rows, body rows
        i += 1
        for section in sections:
            while i < len(lines) and not rule.match(lines[i]):
                if lines[i].strip():
                    section.append(_cells(lines[i], starts))
                i += 1
            i += 1  # the rule that closes the section
        header, body = sections
        pad = " " * _indent(border)
        heading = header[0] if header else [""] * len(starts)
        result.append(f"{pad}| " + " | ".join(heading) + " |")
        result.append(f"{pad}|" + "|".join("---" for _ in starts) + "|")
        result += [f"{pad}| " + " | ".join(row) + " |" for row in body]
    return result


def _cells(line: str, starts: Sequence[int]) -> list[str]:
    """The cells of a simple-table row; the last column takes the rest of the line."""
    ends = [*starts[1:], len(line)]
    return [line[start:end].strip() for start, end in zip(starts, ends, strict=True)]


def _literal_markers(lines: list[str]) -> list[str]:
    """``Run it with::`` becomes ``Run it with:``; the indented block that follows is code."""
    return [re.sub(r"(?<=\S)::$", ":", line) for line in lines]


def _list_continuations(lines: list[str]) -> list[str]:
    """Indent the continuation blocks of ``* item`` list items by 4 spaces, not reST's 2."""
    result: list[str] = []
    item: int | None = None  # the indentation of the current bullet
    for line in lines:
        bullet = re.match(r"^( *)[*-] \S", line)
        if bullet is not None:
            item = len(bullet.group(1))
        elif item is not None and line.strip():
            if _indent(line) < item + 2:
                item = None
            else:
                line = "  " + line
        result.append(line)
    return result


def rst_to_markdown(text: str, resolve: Resolver | None = None) -> str:
    """Rewrite the reST markup of one docstring as Markdown (see the module docstring).

    Args:
        text: the docstring.
        resolve: ``resolve(role, target)``: the identifier a cross-reference links to,
            or None to render it as code. Without it, every reference is code.
    """
    lines = _list_continuations(_literal_markers(_math_blocks(_tables(text.split("\n")))))
    out: list[str] = []
    in_code = False
    for line in lines:
        if line.lstrip().startswith("```"):
            in_code = not in_code
        out.append(line if in_code else _roles(line, resolve))
    return "\n".join(out)


def _roles(line: str, resolve: Resolver | None) -> str:
    """The roles of one line as Markdown links or code spans."""

    def replace(match: re.Match[str]) -> str:
        role, body = match.group("role"), match.group("body")
        if role == "math":
            return f"`{latex_to_text(body)}`"
        explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", body)
        if explicit is not None:
            title, target = explicit.group("title"), explicit.group("target")
        else:
            target = body.lstrip("~")
            title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
            if role in ("func", "meth"):
                title += "()"
        identifier = resolve(role, target) if resolve is not None else None
        return f"[`{title}`][{identifier}]" if identifier else f"`{title}`"

    return _ROLE.sub(replace, line)


class RstMarkup(griffe.Extension):
    """Rewrites the reST markup of a package's docstrings before mkdocstrings renders them.

    Args:
        rendered: the modules whose public members the site renders; the package
            itself stands for the names in its ``__all__``. References to other
            objects are rendered as code.
    """

    def __init__(self, rendered: Sequence[str] = ()) -> None:
        super().__init__()
        self.rendered = frozenset(rendered)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite every docstring of ``pkg``: modules, classes, functions, attributes."""
        for obj in _walk(pkg):
            if obj.docstring is None:
                continue

            def resolve(role: str, target: str, obj: griffe.Object = obj) -> str | None:
                return self._resolve(loader, obj, target)

            obj.docstring.value = rst_to_markdown(obj.docstring.value, resolve)

    def _resolve(self, loader: griffe.GriffeLoader, obj: griffe.Object, target: str) -> str | None:
        """The identifier that ``target`` links to from ``obj``'s docstring, if rendered."""
        scopes: list[str] = []
        scope: griffe.Object | None = obj
        while scope is not None:
            if scope.is_module or scope.is_class:
                scopes.append(scope.path)
            scope = scope.parent
        for candidate in [target, *(f"{path}.{target}" for path in scopes)]:
            try:
                canonical = str(loader.modules_collection[candidate].canonical_path)
            except (KeyError, ValueError, griffe.AliasResolutionError):
                continue
            if self._is_rendered(loader, canonical):
                return canonical
            _log.debug("%s: %r is not rendered on the site: shown as code", obj.path, target)
            return None
        _log.debug("%s: %r does not resolve: shown as code", obj.path, target)
        return None

    def _is_rendered(self, loader: griffe.GriffeLoader, path: str) -> bool:
        """Whether the object at the canonical ``path`` has a heading on the site."""
        obj: griffe.Object = loader.modules_collection[path]
        if obj.is_module:
            return path in self.rendered
        chain: list[griffe.Object] = []  # obj, its class..., the module-level object
        node: griffe.Object | None = obj
        while node is not None and not node.is_module:
            chain.append(node)
            node = node.parent
        if node is None:
            return False
        top = chain[-1]
        package = node.package
        exported = package.path in self.rendered and top.name in (package.exports or ())
        in_module = node.path in self.rendered and top.is_public
        if not (exported or in_module):
            return False
        return all(
            not member.name.startswith("_") and member.has_docstring for member in chain[:-1]
        )


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    """``obj`` and every object it defines (imported names left out)."""
    yield obj
    for member in obj.members.values():
        if isinstance(member, griffe.Object):
            yield from _walk(member)
