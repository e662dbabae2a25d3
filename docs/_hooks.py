"""MkDocs hook: links from the docs to files elsewhere in the repository (``../benchmarks/results/full.jsonl``).

Such links work when the Markdown is read in the repository; for the site, every linked repository file that exists
is added to the build under ``repo/<path>`` and the link is rewritten to it, so MkDocs validates it like any other
link. A link to a repository file that does not exist is left as it is, and ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(\]\()((?:\.\./)+[^)\s#]+)((?:#[^)\s]*)?\))")
PREFIX = "repo"


def _target(src_uri: str, link: str) -> str | None:
    """The repository-relative path ``link`` points to from page ``src_uri``, if it leaves docs/ and exists."""
    path = posixpath.normpath(posixpath.join("docs", posixpath.dirname(src_uri), link))
    if path.startswith(("docs/", "../")) or path == "docs" or not (REPO / path).is_file():
        return None
    return path


def on_files(files: Files, config: Any) -> Files:
    """Add every repository file a page links to (read once here; pages are parsed again below)."""
    wanted: set[str] = set()
    for f in files.documentation_pages():
        text = Path(f.abs_src_path).read_text(encoding="utf-8")
        wanted.update(t for link in LINK.findall(text) if (t := _target(f.src_uri, link[1])))
    for path in sorted(wanted):
        files.append(File.generated(config, f"{PREFIX}/{path}", abs_src_path=str(REPO / path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point links to repository files at their copies under ``repo/``."""
    src_uri = page.file.src_uri

    def rewrite(m: re.Match[str]) -> str:
        target = _target(src_uri, m.group(2))
        if target is None:
            return m.group(0)
        rel = posixpath.relpath(f"{PREFIX}/{target}", posixpath.dirname(src_uri) or ".")
        return f"{m.group(1)}{rel}{m.group(3)}"

    return LINK.sub(rewrite, markdown)
