"""pyproject.toml's minimum versions are the ones CI installs in its second environment (.ci/floor-constraints.txt)."""

import re

from tests.helpers import REPO_ROOT


def _project_dependencies() -> list[str]:
    """The dependencies and the ``sd`` extra (the Stable Diffusion pipelines' transformers)."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.MULTILINE | re.DOTALL).group(1)
    sd_extra = re.search(r"^sd = \[(.*?)\]", text, re.MULTILINE).group(1)
    return re.findall(r'^\s*"([^"]+)"', block, re.MULTILINE) + re.findall(r'"([^"]+)"', sd_extra)


def test_every_floor_is_pinned_in_the_floor_constraints():
    floors = {}
    for requirement in _project_dependencies():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)(;.*)?", requirement)
        assert match, f"{requirement!r}: every dependency needs a '>=' floor (and no other bound)"
        floors[match.group(1).lower()] = match.group(2)
    pins = {}
    for line in (REPO_ROOT / ".ci" / "floor-constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    assert pins == floors
