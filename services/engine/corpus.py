"""Varied English prose for filler and KL text, from what every CPython ships (nothing downloaded).

Sources: the pydoc topic texts, the docstrings of the stdlib's own modules, classes and functions, and
CPython's LICENSE.txt. They are cut into passages of a few sentences; a passage that looks like code (few
letters, `>>>` prompts) is dropped, and so is any passage sharing a sentence with an earlier one, so no
document built from them repeats a sentence (a head that copies the previous repeat of a fixed filler
sentence would shortcut a retrieval task).

Each passage belongs to exactly one PART, chosen by a hash of its text: calibration searches on one part,
validates on another, and the benchmarks read a third, so no number is measured on text the search saw.
"""
from __future__ import annotations

import ast
import hashlib
import random
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

PARTS = ("calibration", "validation", "bench")
_PART_OF_BUCKET = ("calibration",) * 6 + ("validation",) * 2 + ("bench",) * 2   # hash % 10 -> part
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")   # where passages may be cut
_ANY_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")          # finer, for "no sentence twice"
_MAX_PASSAGE_CHARS = 420      # about 90 tokens: fine-grained enough to place a fact at a tenth of 400 tokens


def _pydoc_texts() -> list[str]:
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def _stdlib_docstrings() -> list[str]:
    """Docstrings of the stdlib's top-level .py modules, their classes and functions, in file order."""
    texts = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return texts


def _license_text() -> list[str]:
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    return [path.read_text(encoding="utf-8", errors="replace")] if path.exists() else []


def _is_prose(passage: str) -> bool:
    letters = sum(c.isalpha() or c.isspace() for c in passage)
    return (len(passage) >= 120 and letters >= 0.9 * len(passage) and ">>>" not in passage
            and passage.count("(") <= 2 and "_" not in passage)


def _passages(text: str) -> list[str]:
    """Paragraphs, whitespace collapsed, long ones cut at sentence ends into passages of a few sentences."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.startswith((" ", "\t")):          # indented blocks are code or grammar in these texts
            continue
        chunk = ""
        for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
            if chunk and len(chunk) + len(sentence) > _MAX_PASSAGE_CHARS:
                out.append(chunk)
                chunk = ""
            chunk = f"{chunk} {sentence}".strip()
        if chunk:
            out.append(chunk)
    return out


def part_of(passage: str) -> str:
    bucket = int(hashlib.sha256(passage.encode()).hexdigest(), 16) % len(_PART_OF_BUCKET)
    return _PART_OF_BUCKET[bucket]


@lru_cache(maxsize=None)
def passages(part: str) -> tuple[str, ...]:
    """The prose passages of one part, in source order; no sentence appears twice in the whole corpus."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    return _split_corpus()[part]


@lru_cache(maxsize=1)
def _split_corpus() -> dict[str, tuple[str, ...]]:
    seen_sentences: set[str] = set()
    parts: dict[str, list[str]] = {p: [] for p in PARTS}
    for text in _pydoc_texts() + _stdlib_docstrings() + _license_text():
        for passage in _passages(text):
            sentences = _ANY_SENTENCE_END.split(passage)
            if (not _is_prose(passage) or len(set(sentences)) < len(sentences)
                    or any(s in seen_sentences for s in sentences)):
                continue
            seen_sentences.update(sentences)
            parts[part_of(passage)].append(passage)
    return {p: tuple(v) for p, v in parts.items()}


class Filler:
    """Passages of one part with their token counts, drawn in runs from a random start (one tokenizer)."""

    def __init__(self, tokenizer, part: str):
        self.passages = passages(part)
        self.n_tokens = [len(ids) for ids in tokenizer(list(self.passages), add_special_tokens=False).input_ids]

    def draw(self, n_tokens: int, rng: random.Random) -> list[int]:
        """Indices of consecutive passages (wrapping) from a random start, about `n_tokens` tokens, none twice."""
        start = rng.randrange(len(self.passages))
        out, total = [], 0
        for i in range(len(self.passages)):
            j = (start + i) % len(self.passages)
            if total >= n_tokens:
                break
            out.append(j)
            total += self.n_tokens[j] + 1
        if total < n_tokens:
            raise ValueError(f"the corpus part holds fewer than {n_tokens} tokens")
        return out


@lru_cache(maxsize=8)
def filler(tokenizer, part: str) -> Filler:
    return Filler(tokenizer, part)


def prose_ids(tokenizer, part: str, n_tokens: int, index: int) -> list[int]:
    """`n_tokens` ids of running prose from one part; `index` picks a different stretch each time."""
    fill = filler(tokenizer, part)
    chosen = fill.draw(n_tokens + 64, random.Random(f"prose-{part}-{index}"))
    return tokenizer("\n\n".join(fill.passages[i] for i in chosen), add_special_tokens=False).input_ids[:n_tokens]
