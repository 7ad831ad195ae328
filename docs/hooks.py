"""MkDocs hook: links from a page to a repository file whose content moved into the site point at the page
that holds it now (docs/data.md links to `../launch/README.md` and `../README.md#performance`, written when those
held the text). Any other link out of docs/ is left alone, so `mkdocs build --strict` still fails on it."""

from __future__ import annotations

import posixpath
import re

# repository path (optionally with its #anchor) -> page under docs/ that holds the content now
MOVED = {
    "README.md#performance": "reference/performance.md",
    "launch/README.md": "guides/clusters.md",
    "README.md": "index.md",
}
LINK = re.compile(r"\]\((?P<target>\.\./[^)\s]+)\)")


def on_page_markdown(markdown: str, page, config, files) -> str:
    page_dir = posixpath.dirname(page.file.src_uri)

    def replace(match: re.Match) -> str:
        target = match.group("target")
        repo_path = posixpath.normpath(posixpath.join("docs", page_dir, target))
        if not repo_path.startswith("../") and not repo_path.startswith("docs/"):
            path, _, anchor = repo_path.partition("#")
            moved = MOVED.get(repo_path) or MOVED.get(path)
            if moved:
                keep = f"#{anchor}" if anchor and repo_path not in MOVED else ""
                return f"]({posixpath.relpath(moved, page_dir or '.')}{keep})"
        return match.group(0)

    return LINK.sub(replace, markdown)
