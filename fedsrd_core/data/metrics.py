"""Exact-match scoring of short generated answers."""

from __future__ import annotations


def normalize_answer(s: str) -> str:
    """Canonical form of an answer for exact match.

    Strips surrounding whitespace and one trailing period, and collapses inner runs of
    whitespace to one space. Case is kept: the code and rewrite answers are case-sensitive
    (``getUserName`` vs ``getusername``, an uppercase rewrite), so folding case would count
    wrong answers as right. Only one period goes, so ``"3."`` matches ``"3"`` while an
    answer that genuinely ends in ``".."`` keeps one.
    """
    s = " ".join(s.split())
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def exact_match(prediction: str, reference: str) -> bool:
    """True when ``prediction`` and ``reference`` are equal after ``normalize_answer``."""
    return normalize_answer(prediction) == normalize_answer(reference)


def first_line(generated: str) -> str:
    """The answer part of a generation: its text up to the first newline.

    Leading blank lines are skipped first: some models open the response with a newline
    after the ``### Response:`` header, and scoring that as an empty answer would measure
    formatting rather than knowledge.
    """
    lines = generated.split("\n")
    for line in lines:
        if line.strip():
            return line.rstrip("\r")
    return ""
