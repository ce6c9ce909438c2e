"""tasks/commands/offline_plots.py: `dvc plots show` pages that render with no internet, checked in a real browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tasks.commands.offline_plots import TEMPLATE, TemplateError, _read_member, check_template

from .conftest import REPO_ROOT, dvc, make_params_document, make_project, write_synthetic


def test_the_committed_template_carries_the_pinned_scripts_and_dvc_uses_it() -> None:
    check_template(REPO_ROOT / TEMPLATE)
    config = (REPO_ROOT / ".dvc" / "config").read_text()
    assert re.search(r"\[plots\]\s+html_template = plots-offline.html", config)


def test_a_tampered_script_is_refused(tmp_path: Path) -> None:
    page = (REPO_ROOT / TEMPLATE).read_text()
    tampered = tmp_path / "page.html"
    inside = page.index('<script data-package="vega-lite@5.2.0">') + 500  # one byte inside a script
    tampered.write_text(page[:inside] + ("x" if page[inside] != "x" else "y") + page[inside + 1:])
    with pytest.raises(TemplateError, match="does not match the pinned"):
        check_template(tampered)
    tampered.write_text(page.replace("{plot_divs}", '<script src="https://example.invalid/x.js"></script>'))
    with pytest.raises(TemplateError, match="external <script src>"):
        check_template(tampered)


def test_only_regular_files_are_read_from_a_package(tmp_path: Path) -> None:
    tarball = tmp_path / "package.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        link = tarfile.TarInfo("package/build/vega.min.js")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(TemplateError, match="is not a regular file"):
        _read_member(tarball, "package/build/vega.min.js", "vega")


def _rendered_canvases(page: Path) -> int:
    """Vega charts drawn by headless Chromium with every network request failing."""
    result = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
                             "--virtual-time-budget=15000", "--dump-dom", page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    return len(re.findall(r'<canvas[^>]*class="marks"', result.stdout))


@pytest.mark.slow
def test_plots_render_offline_in_a_headless_browser(tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    write_synthetic(tmp_path / "source")
    project = make_project(tmp_path / "project", make_params_document(tmp_path / "source"))
    curves = project / "reports" / "train" / "plots" / "metrics"  # as train writes them through DVCLive
    curves.mkdir(parents=True)
    (project / "reports" / "plots").mkdir(parents=True)
    for name, values in (("loss", (2.0, 1.0)), ("learning_rate", (0.8, 0.7)), ("validation_accuracy_raw", (0.5, 0.8)),
                         ("validation_accuracy", (0.4, 0.7))):
        (curves / f"{name}.tsv").write_text(f"step\t{name}\n1\t{values[0]}\n2\t{values[1]}\n")
    (project / "reports" / "plots" / "confusion.csv").write_text("actual,predicted\n0,0\n1,1\n1,0\n")
    dvc(project, "plots", "show", "-o", "default")  # DVC's own page: scripts from a CDN
    shutil.copy(REPO_ROOT / TEMPLATE, project / TEMPLATE)
    dvc(project, "config", "plots.html_template", TEMPLATE.name)
    dvc(project, "plots", "show", "-o", "offline")
    assert "cdn.jsdelivr" in (project / "default" / "index.html").read_text()
    assert "<script src" not in (project / "offline" / "index.html").read_text()
    assert _rendered_canvases(project / "default" / "index.html") == 0  # blank without internet
    assert _rendered_canvases(project / "offline" / "index.html") == 4  # confusion, accuracy, loss, rate
