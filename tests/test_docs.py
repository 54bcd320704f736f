"""The repository stands alone: no pointer outside it, and every link in the docs resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".cfg", ".toml", ".ipynb", ".txt", ".json"}
SCANNED = ["README.md", "Makefile", "setup.cfg", "pyproject.toml", "run.py",
           "tdd", "tests", "conf", "docs", "experiments", "notebooks"]
# A folder beside the checkout and an outside methods file, spelled in pieces so that this file
# does not match itself; the quoted form catches a path built as ``parents[2] / <folder>``.
SIBLING = "sha" + "red"
OUTSIDE = [
    re.compile(re.escape(SIBLING + "/")),
    re.compile("[\"']" + SIBLING + "[\"']"),
    re.compile(re.escape("METH" + "ODS.md")),
]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
DOC_PAGE = ROOT / "docs" / "methods.md"


def text_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file()
                      and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return files


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "experiments").rglob("*.md"))]


def relative_links(markdown: str) -> list[str]:
    """Link targets outside code, without URLs, mail links and same-page anchors."""
    prose = INLINE_CODE.sub("", FENCE.sub("", markdown))
    targets = [m.group(1) for m in LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t)]


def test_nothing_points_outside_the_repository():
    files = text_files()
    assert ROOT / "README.md" in files and DOC_PAGE in files
    assert any(p.suffix == ".py" for p in files) and any(p.suffix == ".yaml" for p in files)
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}"
        for path in files
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if any(pattern.search(line) for pattern in OUTSIDE)
    ]
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


@pytest.mark.parametrize("markdown", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_in_the_repository(markdown):
    links = relative_links(markdown.read_text())
    broken = []
    for link in links:
        target = (markdown.parent / link.split("#")[0]).resolve()
        if not target.exists() or not target.is_relative_to(ROOT):
            broken.append(link)
    assert not broken, f"{markdown.relative_to(ROOT)}: broken or outside links {broken}"


def test_the_readme_and_the_methods_doc_link_each_other_and_the_code():
    readme_links = relative_links((ROOT / "README.md").read_text())
    assert "docs/methods.md" in readme_links
    methods_links = relative_links(DOC_PAGE.read_text())
    assert len([link for link in methods_links if link.endswith(".py")]) >= 15


def test_code_paths_named_in_the_methods_doc_exist():
    named = {token.strip("`") for token in INLINE_CODE.findall(DOC_PAGE.read_text())}
    top = "|".join(["tdd", "conf", "tests", "docs", "experiments", "notebooks"])
    paths = [t for t in named if re.fullmatch(rf"({top})/[\w./-]*", t)]
    assert len(paths) >= 5
    missing = [p for p in sorted(paths) if not (ROOT / p).exists()]
    assert not missing, f"docs/methods.md names paths that do not exist: {missing}"


def test_cited_sections_of_the_methods_doc_exist():
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", DOC_PAGE.read_text(), re.M))
    number = r"(\d+(?:\.\d+)?)"
    cite = re.compile(rf"docs/methods\.md,?(?: sections?)? {number}(?: and {number})?")
    cited = {}
    for path in text_files():
        for match in cite.finditer(path.read_text(errors="replace")):
            for number in filter(None, match.groups()):
                cited.setdefault(number, []).append(str(path.relative_to(ROOT)))
    assert {"0", "1.1", "2", "3", "4"} <= set(cited)
    unknown = {n: files for n, files in cited.items() if n not in headings}
    assert not unknown, f"cited sections missing from docs/methods.md: {unknown}"


def paragraph(lead: str) -> str:
    """The docs/methods.md paragraph (or list item) that starts with ``lead``, on one line."""
    for block in re.split(r"\n\s*\n|\n(?=- )", DOC_PAGE.read_text()):
        text = " ".join(block.split())
        if text.lstrip("- ").startswith(lead):
            return text
    raise AssertionError(f"docs/methods.md has no paragraph starting with {lead!r}")


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def test_the_timestep_tables_of_the_methods_doc_are_what_the_code_computes():
    from tdd.sampling import PCMSampler
    from tdd.schedule import DistillationGrid
    from tdd.schedulers import TDDScheduler
    from tdd.strategies import PCMTarget, TDDTarget

    candidates = re.findall(r"N = (\d+): \{([^}]*)\}", paragraph("**Candidate set M**"))
    assert [n for n, _ in candidates] == ["250", "50"]
    for n, values in candidates:
        assert numbers(values) == TDDTarget(num_ddim_timesteps=int(n)).candidates.tolist()

    grid = re.findall(r"N = (\d+), K = (\d+): ([\d, ]+\d)", paragraph("**Grid timesteps.**"))
    assert len(grid) == 3
    for n, k, values in grid:
        assert numbers(values) == DistillationGrid(1000, int(n)).schedule(int(k)).tolist()

    pcm = re.search(r"N = 50, M = 4: edge indices ([\d, ]+\d) and edge timesteps ([\d, ]+\d)",
                    paragraph("**PCM.**"))
    target = PCMTarget(1000, 50, num_phases=4)
    assert numbers(pcm.group(1)) == target.edge_indices.tolist()
    assert numbers(pcm.group(2)) == target.edge_timesteps.tolist()
    sampler = re.search(r"N = 50, K = 4: ([\d, ]+\d) ->", paragraph("**PCM sampler**"))
    assert numbers(sampler.group(1)) == PCMSampler(50).timesteps(4)

    published = re.findall(r"K = (\d+): ([\d, ]+\d)", paragraph("**Non-equidistant schedules**"))
    assert [k for k, _ in published] == ["5", "6", "7"]
    scheduler = TDDScheduler(tdd_train_step=250, special_jump=True)
    for k, values in published:
        scheduler.set_timesteps(int(k))
        assert numbers(values) == scheduler.timesteps.tolist()
