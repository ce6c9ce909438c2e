"""An HTML template that makes `dvc plots show` / `dvc plots diff` pages work without internet.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so on an offline machine
every interactive plot is blank. ``.dvc/config`` points ``plots.html_template`` at
``.dvc/plots-offline.html``, which carries the three scripts inline (the page is then one
self-contained file, wherever `-o` writes it). The versions are the ones DVC's renderer asks
the CDN for; each script is checked against its SHA-256 before it goes into the page.

    python -m tasks.commands.offline_plots            # rebuild .dvc/plots-offline.html from the npm registry
    python -m tasks.commands.offline_plots --check    # verify the committed template (no network)
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tarfile
import tempfile
from pathlib import Path

from tasks.lib import processes
from tasks.lib.atomic import write_bytes_atomic

TEMPLATE = Path(".dvc/plots-offline.html")
# (npm package@version, file inside the package tarball, SHA-256 of that file)
SCRIPTS = (
    ("vega@5.20.2", "package/build/vega.min.js",
     "4794d0169cb1f3ebad8117fe98ba5bd652dd725905ec0384e832391dbccb03be"),
    ("vega-lite@5.2.0", "package/build/vega-lite.min.js",
     "d73157451b3978015ab31dacd55ff90d986ab8663fc0abed50f97b3cd90002cb"),
    ("vega-embed@6.18.2", "package/build/vega-embed.min.js",
     "1ba9826431ddc9805e815ad92acc811c819f2bfd32bda2a128b8c4b5070fab5e"),
)
_MAX_SCRIPT_BYTES = 4 << 20
_PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
{inline_scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""
_BEGIN = re.compile(r"<script data-package=\"([^\"]+)\">\n")


class TemplateError(RuntimeError):
    """A script is missing, too large, or does not match its checksum."""


def _verified(content: bytes, package: str, expected: str) -> str:
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected:
        raise TemplateError(f"{package}: SHA-256 {actual[:16]}... does not match the pinned {expected[:16]}...")
    text = content.decode("utf-8")
    if "</script" in text.lower() or "{plot_divs}" in text or "{refresh_tag}" in text:
        raise TemplateError(f"{package}: the script cannot be inlined safely")
    return text


def _read_member(tarball: Path, member: str, package: str) -> bytes:
    """One regular file out of an npm tarball, size-checked before it is read."""
    with tarfile.open(tarball, "r:gz") as archive:
        info = archive.getmember(member)
        if not info.isfile() or info.size > _MAX_SCRIPT_BYTES:
            raise TemplateError(f"{package}: {member} is not a regular file under {_MAX_SCRIPT_BYTES} bytes")
        stream = archive.extractfile(info)
        assert stream is not None
        return stream.read()


def fetch_scripts() -> dict[str, str]:
    """Each script's verified text, from `npm pack` of the pinned versions."""
    scripts = {}
    with tempfile.TemporaryDirectory(prefix="vega-") as scratch:
        for package, member, sha256 in SCRIPTS:
            result = processes.run(["npm", "pack", "--silent", package], cwd=scratch)
            if result.returncode != 0:
                raise TemplateError(f"npm pack {package} failed: {result.stderr.strip()[-300:]}")
            tarball = Path(scratch) / result.stdout.strip().splitlines()[-1]
            scripts[package] = _verified(_read_member(tarball, member, package), package, sha256)
    return scripts


def render_template(scripts: dict[str, str]) -> str:
    blocks = [f'<script data-package="{package}">\n{scripts[package]}\n</script>' for package, _, _ in SCRIPTS]
    return _PAGE.format(inline_scripts="\n".join(blocks), refresh_tag="{refresh_tag}", plot_divs="{plot_divs}")


def check_template(path: Path) -> None:
    """The committed template carries exactly the pinned scripts and loads nothing from elsewhere."""
    page = path.read_text(encoding="utf-8")
    if "{plot_divs}" not in page or "{scripts}" in page or re.search(r"<script[^>]*\bsrc=", page):
        raise TemplateError(f"{path}: needs {{plot_divs}}, and no {{scripts}} or external <script src>")
    found = {match.group(1): match.end() for match in _BEGIN.finditer(page)}
    for package, _, sha256 in SCRIPTS:
        if package not in found:
            raise TemplateError(f"{path}: {package} is not inlined")
        body = page[found[package]:page.index("\n</script>", found[package])]
        _verified(body.encode("utf-8"), package, sha256)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="verify the committed template; no network")
    parser.add_argument("--output", type=Path, default=TEMPLATE)
    args = parser.parse_args(argv)
    try:
        if not args.check:
            write_bytes_atomic(args.output, render_template(fetch_scripts()).encode("utf-8"))
        check_template(args.output)
    except (TemplateError, OSError, KeyError, tarfile.TarError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.output}: vega, vega-lite and vega-embed inline, checksums verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
