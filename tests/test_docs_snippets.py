"""The docs cannot drift: every Python snippet and command line in README.md and docs/*.md
is run here, or carries a visible reason why it cannot run on a CPU-only machine without
network.

A code block is a fenced block with a language. `python` blocks run in one namespace per
document, in order (a document reads top to bottom); `bash` / `sh` / `shell` blocks run line
by line (`\\` continues a line, `#` starts a comment), each line a `bunny ...` command (run
through `bunny.cli.main`, what the `bunny` script calls, in this process so that the imports
are paid once) or a `python ...` command (a subprocess). Other languages (`text`, `json`,
`yaml`, ...) are output, file contents or usage synopses and are not run; one with the line
`<!-- file: NAME -->` right before it is written to NAME when the run reaches it (a recipe
the next command reads). A block that cannot run here (GPU, hub downloads, multi-node, long
runs) has the line `<!-- not run: REASON -->` right before it. Everything runs offline in a
temporary folder holding tiny fixtures under the names the docs use (`path/to/checkpoint`,
`photo.jpg`, ...; `workspace` below).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = {"python", "bash", "sh", "shell"}
NOT_CODE = {"text", "json", "jsonl", "yaml", "toml", "jinja", "html", "diff", "dockerfile", "ini", "csv"}
MARK = re.compile(r"^\s*<!--\s*not run:(.*?)-->\s*$")
FILE = re.compile(r"^\s*<!--\s*file:(.*?)-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s")
COMMAND_TIMEOUT_S = 300


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    reason: str | None  # the `not run` reason, None when the block is to run
    file: str | None = None  # where the run writes the block's text (a `file:` marker)


def parse(markdown: str, doc: str) -> list[Block]:
    """The fenced blocks of a Markdown text. Raises ValueError for what the test cannot
    classify: an unclosed fence, an indented code block, a `not run` marker with no reason
    or not followed by a fenced block."""
    lines = markdown.split("\n")
    blocks: list[Block] = []
    pending: tuple[int, str, str] | None = None  # (line, kind, value) of a marker waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        mark = MARK.match(line) or FILE.match(line)
        fence = FENCE.match(line)
        if mark:
            kind = "not run" if mark.re is MARK else "file"
            value = mark.group(1).strip()
            if not value:
                raise ValueError(f"{doc}:{i + 1}: `{kind}` marker without a " + ("reason" if kind == "not run" else "name"))
            pending = (i + 1, kind, value)
        elif fence:
            indent, ticks, lang = fence.groups()
            end = next((j for j in range(i + 1, len(lines))
                        if lines[j].strip().startswith(ticks) and not lines[j].strip()[len(ticks):].strip()), None)
            if end is None:
                raise ValueError(f"{doc}:{i + 1}: fenced block never closed")
            body = "\n".join(x[len(indent):] if x.startswith(indent) else x.lstrip() for x in lines[i + 1:end])
            marker = {pending[1]: pending[2]} if pending else {}
            block = Block(doc, i + 1, lang.lower(), body, marker.get("not run"), marker.get("file"))
            if block.file and (block.lang in CODE or Path(block.file).is_absolute() or ".." in Path(block.file).parts):
                raise ValueError(f"{doc}:{i + 1}: a `file` marker names a relative path and precedes a data block")
            blocks.append(block)
            pending = None
            i = end
        elif line.strip():
            if pending:
                raise ValueError(f"{doc}:{pending[0]}: `{pending[1]}` marker not right before a fenced block")
            if (line.startswith("    ") and i > 0 and not lines[i - 1].strip()
                    and _paragraph_start(lines, i - 1) is not None):
                raise ValueError(f"{doc}:{i + 1}: indented code block; use a fenced block with a language")
        i += 1
    if pending:
        raise ValueError(f"{doc}:{pending[0]}: `{pending[1]}` marker at the end of the file")
    return blocks


def _paragraph_start(lines: list[str], blank: int) -> int | None:
    """The previous non-blank line before `blank` when it is top-level prose (so that an
    indented line after the blank is a code block, not a list item's continuation)."""
    j = blank
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0:
        return None
    # Walk up to the start of that paragraph: a list item or an indented line makes it list content.
    while j >= 0 and lines[j].strip():
        if LIST_ITEM.match(lines[j]) or lines[j].startswith(" "):
            return None
        j -= 1
    return j + 1


def commands(block: Block) -> list[list[str]]:
    """A shell block's command lines as argument lists (continuations joined, comments dropped)."""
    joined, current = [], ""
    for raw in block.text.split("\n"):
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            argv = shlex.split(current, comments=True)
            if argv:
                joined.append(argv)
        current = ""
    return joined


def runnable_problem(block: Block) -> str | None:
    """Why an unmarked block cannot be run by this test, or None."""
    if not block.lang:
        return "a fenced block needs a language (python, bash, text, ...)"
    if block.lang in NOT_CODE:
        return None
    if block.lang not in CODE:
        return f"unknown block language {block.lang!r}"
    if block.lang == "python":
        try:
            compile(block.text, f"{block.doc}:{block.line}", "exec")
        except SyntaxError as e:
            return f"not valid Python: {e}"
        return None
    for argv in commands(block):
        if program(argv[0]) is None:
            return f"runs {argv[0]!r}: only bunny and python commands are run here; mark the block `not run` with the reason"
    return None


def program(name: str) -> str | None:
    """The executable a doc's command word names, in this environment."""
    bindir = Path(sys.executable).parent
    if name in ("bunny", ".venv/bin/bunny"):
        return str(bindir / "bunny")
    if name in ("python", "python3", ".venv/bin/python"):
        return sys.executable
    return None


def all_blocks() -> list[Block]:
    blocks = []
    for path in DOCS:
        blocks += parse(path.read_text(), str(path.relative_to(ROOT)))
    return blocks


# ---- the parser itself ----

def test_parse_classifies_marked_unmarked_and_data_blocks():
    md = ("# t\n\n```python\nx = 1\n```\n\n<!-- not run: needs a GPU -->\n```bash\nbunny demo\n```\n\n"
          "```text\noutput\n```\n\n- item\n\n  ```bash\n  bunny --help  # comment\n  ```\n")
    blocks = parse(md, "t.md")
    assert [(b.lang, b.reason) for b in blocks] == [("python", None), ("bash", "needs a GPU"), ("text", None),
                                                      ("bash", None)]
    assert commands(blocks[3]) == [["bunny", "--help"]]
    assert [runnable_problem(b) for b in blocks] == [None, None, None, None]
    recipe = parse("<!-- file: conf/a.yaml -->\n```yaml\nlr: 1\n```\n", "t.md")
    assert [(b.lang, b.file, b.reason) for b in recipe] == [("yaml", "conf/a.yaml", None)]


def test_commands_join_continuations_and_drop_comments():
    block = Block("t.md", 1, "bash", "# a comment\nbunny data shard --input a.json \\\n    --out 'x y/'  # why\n\n", None)
    assert commands(block) == [["bunny", "data", "shard", "--input", "a.json", "--out", "x y/"]]


@pytest.mark.parametrize("md, message", [
    ("```\nbunny demo\n```\n", None),  # parsed; refused by runnable_problem below
    ("<!-- not run: -->\n```bash\nx\n```\n", "without a reason"),
    ("<!-- not run: GPU -->\nprose\n```bash\nx\n```\n", "not right before"),
    ("```bash\nbunny demo\n", "never closed"),
    ("Run this:\n\n    bunny demo\n", "indented code block"),
    ("<!-- not run: GPU -->\n", "end of the file"),
    ("<!-- file: a.sh -->\n```bash\nbunny demo\n```\n", "precedes a data block"),
    ("<!-- file: ../a.yaml -->\n```yaml\nlr: 1\n```\n", "relative path"),
    ("<!-- file: -->\n```yaml\nlr: 1\n```\n", "without a name"),
])
def test_parse_refuses_what_it_cannot_classify(md, message):
    if message is None:
        assert runnable_problem(parse(md, "t.md")[0]) == "a fenced block needs a language (python, bash, text, ...)"
        return
    with pytest.raises(ValueError, match=message):
        parse(md, "t.md")


def test_runnable_problem_names_foreign_commands_and_bad_python():
    assert "only bunny and python" in runnable_problem(Block("t.md", 1, "bash", "curl http://x\n", None))
    assert "not valid Python" in runnable_problem(Block("t.md", 1, "python", "def (:\n", None))
    assert "unknown block language" in runnable_problem(Block("t.md", 1, "rust", "fn main() {}\n", None))


# ---- the docs ----

def test_every_code_block_is_run_or_says_why_not():
    problems = [f"{b.doc}:{b.line}: {p}" for b in all_blocks() if b.reason is None
                for p in [runnable_problem(b)] if p]
    assert not problems, "\n".join(problems)


SECTION_REF = re.compile(r'(?<![/\w])(docs/[\w-]+\.md)`?,?\s*\(?"([A-Z][^"]{0,79})"')


def section_references(text: str) -> list[tuple[str, str]]:
    """(file, section) pairs a text cites as `docs/X.md, "Section"` (a line break or a
    comment's `#` inside the section name counts as a space)."""
    return [(f, " ".join(re.sub(r"\s#\s", " ", name).split())) for f, name in SECTION_REF.findall(text)]


def test_section_references_find_their_heading():
    cited = re.compile(r"(?<![/\w])(docs/[\w-]+\.md)")
    sources = [*DOCS, *sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "src").rglob("*.yaml")),
               *sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "configs").rglob("*.yaml"))]
    problems = []
    for path in sources:
        text = path.read_text()
        where = path.relative_to(ROOT)
        problems += [f"{where}: {name} does not exist" for name in sorted(set(cited.findall(text)))
                     if not (ROOT / name).is_file()]
        for name, section in section_references(text):
            if (ROOT / name).is_file():
                headings = [" ".join(line.lstrip("#").split()) for line in (ROOT / name).read_text().split("\n")
                            if line.startswith("#")]
                if not any(section in h for h in headings):
                    problems.append(f"{where}: {name} has no heading with {section!r}")
    assert not problems, "\n".join(problems)


def test_section_references_are_found_across_lines_and_comments():
    text = 'see (docs/training.md, "Recipe search\n# on a GPU") and `docs/model.md`, "Hub ids"; ../shared/docs/x.md'
    assert section_references(text) == [("docs/training.md", "Recipe search on a GPU"), ("docs/model.md", "Hub ids")]


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first = parse(text, "README.md")[0]
    before = [line for line in text.split("\n")[:first.line - 1] if line.strip()]
    assert before[0].startswith("# ") and all(MARK.match(line) for line in before[1:]), before
    assert commands(first) == [["make", "demo"], ["make", "test"]]


def _docs_with_runnable_blocks() -> list[str]:
    return sorted({b.doc for b in all_blocks() if b.reason is None and b.lang in CODE})


def run_command(argv: list[str], where: str, cwd: Path, env: dict) -> None:
    if program(argv[0]) == sys.executable:
        done = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        assert done.returncode == 0, (f"{where}: `{shlex.join(argv)}` exited {done.returncode}:\n"
                                      f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return
    from bunny.cli import main

    try:
        code = main(argv[1:])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    assert code in (0, None), f"{where}: `{shlex.join(argv)}` exited {code} (its output is in the captured stderr)"


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A folder holding the inputs the docs name, made tiny: two checkpoints, an image, an LLM
    folder, a SigLIP tower folder, LLaVA JSON data with images, a LAION-layout embedding folder, a
    POPE-layout benchmark file."""
    from transformers import SiglipVisionModel

    from bunny.testing import random_image, save_tiny_bunny, tiny_image_processor, tiny_llm, tiny_vision_config

    save_tiny_bunny(tmp_path / "path/to/checkpoint")
    save_tiny_bunny(tmp_path / "path/to/checkpoint-2", seed=1)
    llm, tokenizer = tiny_llm()
    llm.save_pretrained(tmp_path / "path/to/llm")
    tokenizer.save_pretrained(tmp_path / "path/to/llm")
    random_image(0, (64, 48)).save(tmp_path / "photo.jpg")
    tower = tmp_path / "path/to/siglip"
    SiglipVisionModel(tiny_vision_config("siglip")).save_pretrained(tower)
    tiny_image_processor("siglip").save_pretrained(tower)
    (tmp_path / "images").mkdir()
    samples = []
    for i in range(3):
        random_image(i, (32, 32)).save(tmp_path / f"images/{i}.png")
        samples.append({"id": f"s{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "red"}]})
    (tmp_path / "data.json").write_text(json.dumps(samples))
    laion_layout(tmp_path / "emb")
    pope_file(tmp_path / "pope.parquet")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pope_file(path: Path) -> None:
    """Four questions in lmms-lab/POPE's parquet layout (images as {bytes, path})."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from bunny.testing import random_image

    rows = []
    for i in range(4):
        png = io.BytesIO()
        random_image(i, (32, 32)).save(png, format="PNG")
        rows.append({"question_id": str(i), "image": {"bytes": png.getvalue(), "path": None},
                     "question": "Is there a red circle in the image?", "answer": ("yes", "no")[i % 2],
                     "category": "random"})
    pq.write_table(pa.Table.from_pylist(rows), path)


def laion_layout(root: Path, n: int = 2000, d: int = 64) -> None:
    """Embeddings in the LAION layout: 4 clusters of unit rows, 10% exact duplicates,
    captions near their images."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    centres = unit(rng.normal(size=(4, d)))
    images = unit(centres[rng.integers(4, size=n)] + 0.5 * rng.normal(size=(n, d)) / np.sqrt(d))
    images[n // 2:n // 2 + n // 10] = images[:n // 10]
    texts = unit(images + 1.5 * rng.normal(size=(n, d)) / np.sqrt(d))
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True)
    np.save(root / "img_emb/img_emb_0000.npy", images.astype(np.float16))
    np.save(root / "text_emb/text_emb_0000.npy", texts.astype(np.float16))
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(n)], "caption": [f"c{i}" for i in range(n)]}),
                   root / "metadata/metadata_0000.parquet")


@pytest.fixture
def same_torch_threads():
    """Snippets run in this process: whatever they set, the next test starts with the same thread count."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("doc", _docs_with_runnable_blocks())
def test_doc_snippets_run(doc, workspace, same_torch_threads):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    namespace: dict = {"__name__": "__main__"}
    for block in [b for b in all_blocks() if b.doc == doc and b.reason is None and (b.lang in CODE or b.file)]:
        where = f"{block.doc}:{block.line}"
        if block.file:
            (workspace / block.file).parent.mkdir(parents=True, exist_ok=True)
            (workspace / block.file).write_text(block.text + "\n")
        elif block.lang == "python":
            try:
                exec(compile(block.text, where, "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{where}: the Python block failed: {type(e).__name__}: {e}") from e
        else:
            for argv in commands(block):
                run_command(argv, where, workspace, env)
