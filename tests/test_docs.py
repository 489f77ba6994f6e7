"""The README stays a front page (≤ 15 KB, the two set-up commands) and every relative link of the README
and docs/ resolves, so moving a file cannot silently break the documentation."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
SETUP_COMMANDS = ('python3 -m pip install -e . && python3 main.py --model padim --dataset demo --backbone efficientnet_lite0',
                  'python3 -m pip install -e ".[test]" && python3 -m pytest -q')


def test_readme_is_a_front_page_with_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 15_000
    for command in SETUP_COMMANDS:
        assert f"```bash\n{command}\n```" in readme
    assert "python3 -m pytest -q" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    missing = [t for t in targets if "://" not in t and not t.startswith("mailto:") and not (page.parent / t).exists()]
    assert not missing, missing
