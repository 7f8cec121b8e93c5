"""MkDocs hooks of the torch_maml site.

The examples write their figures into ``docs/images/`` when they run; a fresh clone,
or a branch where an example has not been run yet, may lack some. Rather than fail
the strict build on a missing image, a figure whose file is not there is replaced by
a note that says which file it is and that running the example draws it. The note is
logged at info level (``mkdocs build`` prints it).
"""

from __future__ import annotations

import logging
import posixpath
import re
from typing import Any

from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

__all__ = ["on_page_markdown"]

_log = logging.getLogger("mkdocs.hooks.torch_maml_docs")

_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>images/[^)\s]+\.png)\)")
"""A Markdown image from ``docs/images/``: ``![alt](images/name.png)``."""


def on_page_markdown(markdown: str, *, page: Page, config: Any, files: Files) -> str:
    """Replace the images of ``docs/images/`` that do not exist by a note."""

    def replace(match: re.Match[str]) -> str:
        src = match.group("src")
        path = posixpath.normpath(posixpath.join(posixpath.dirname(page.file.src_uri), src))
        if files.get_file_from_path(path) is not None:
            return match.group(0)
        _log.info("%s: %s does not exist yet; shown as a note", page.file.src_uri, path)
        return f"*[Figure: {match.group('alt')}. Running the example writes it to `docs/{path}`.]*"

    return _IMAGE.sub(replace, markdown)
