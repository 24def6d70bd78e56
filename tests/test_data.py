"""Tests of the offline instruction data: generators, template, file I/O, partitions, metrics.

Answers are re-derived here from the question text alone (re-evaluating, re-sorting,
re-counting), not by calling the generator's own helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fedsrd_core.data import (
    DOMAINS,
    FACT_ATTRIBUTES,
    OOD_DOMAINS,
    DataError,
    Example,
    exact_match,
    fact_table,
    first_line,
    format_prompt,
    generate,
    generate_federation,
    load_examples,
    normalize_answer,
    partition_by_domain,
    partition_dirichlet,
    partition_iid,
    prompt_and_response,
    save_jsonl,
)

ALL_DOMAINS = DOMAINS + OOD_DOMAINS
REPO = Path(__file__).resolve().parents[1]


def pairs(examples: list[Example]) -> set[tuple[str, str]]:
    return {(e.instruction, e.input) for e in examples}


def question(ex: Example) -> str:
    """The problem text, wherever the example put it (instruction or input)."""
    return ex.input if ex.input and ex.instruction.endswith((".", "?")) else ex.instruction


# --------------------------------------------------------------------------------------------
# Example


def test_example_dict_round_trip_and_validation():
    ex = Example("Do it.", "ctx", "done", "code")
    assert Example.from_dict(ex.to_dict()) == ex
    assert ex.to_dict() == {
        "instruction": "Do it.",
        "input": "ctx",
        "output": "done",
        "domain": "code",
    }
    assert Example.from_dict({"instruction": "i", "output": "o", "extra": 1}) == Example(
        "i", "", "o"
    )
    with pytest.raises(ValueError, match="missing field 'instruction'"):
        Example.from_dict({"output": "o"})
    with pytest.raises(ValueError, match="field 'domain' must be a string, got number"):
        Example.from_dict({"instruction": "i", "output": "o", "domain": 3})
    with pytest.raises(TypeError, match=r"Example\.output must be a str"):
        Example("i", "", None)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        ex.output = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# template

WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
)


def test_alpaca_template_exact_strings():
    assert format_prompt("Add the numbers.", "2 and 3") == WITH_INPUT
    assert format_prompt("Say hi.", "") == NO_INPUT
    assert prompt_and_response(Example("Say hi.", "", "hi")) == (NO_INPUT, "hi")
    assert prompt_and_response(Example("Add the numbers.", "2 and 3", "5")) == (WITH_INPUT, "5")


def test_template_keeps_braces_literal():
    prompt = format_prompt("Fill {input} and {0}", "{instruction}")
    assert "### Instruction:\nFill {input} and {0}\n\n### Input:\n{instruction}\n\n" in prompt


def test_plain_text_example_has_empty_prompt():
    ex = Example("", "", "Once upon a time.")
    assert ex.is_plain_text
    assert prompt_and_response(ex) == ("", "Once upon a time.")


# --------------------------------------------------------------------------------------------
# domains: determinism, splits, sizes


@pytest.mark.parametrize("domain", ALL_DOMAINS)
def test_generate_is_deterministic_and_seed_dependent(domain):
    a = generate(domain, 60, seed=3)
    assert a == generate(domain, 60, seed=3)
    assert a != generate(domain, 60, seed=4)
    assert generate(domain, 60, seed=3, split="eval") == generate(domain, 60, seed=3, split="eval")
    assert all(e.domain == domain for e in a)
    # A prefix of a longer request is not promised, but a shorter request is deterministic too.
    assert generate(domain, 0) == []


def test_generate_is_independent_of_hash_seed_and_process():
    # String hashing is salted per process; the data must not depend on it.
    code = (
        "import hashlib, json\n"
        "from fedsrd_core.data import DOMAINS, OOD_DOMAINS, generate\n"
        "blob = json.dumps([[e.to_dict() for e in generate(d, 40, seed=1, split=s)]\n"
        "    for d in DOMAINS + OOD_DOMAINS for s in ('train', 'eval')])\n"
        "print(hashlib.sha256(blob.encode()).hexdigest())\n"
    )
    digests = set()
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    blob = json.dumps(
        [
            [e.to_dict() for e in generate(d, 40, seed=1, split=s)]
            for d in ALL_DOMAINS
            for s in ("train", "eval")
        ]
    )
    digests.add(hashlib.sha256(blob.encode()).hexdigest())
    assert len(digests) == 1


@pytest.mark.parametrize("domain", ALL_DOMAINS)
def test_train_and_eval_never_share_a_pair(domain):
    n_train = 900 if domain == "facts" else 1500
    train = pairs(generate(domain, n_train, seed=0)) | pairs(generate(domain, 300, seed=1))
    evals = pairs(generate(domain, 400, seed=0, split="eval")) | pairs(
        generate(domain, 300, seed=7, split="eval")
    )
    assert not train & evals


@pytest.mark.parametrize("domain", ALL_DOMAINS)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_at_least_200_distinct_examples(domain, split):
    xs = generate(domain, 200, seed=0, split=split)
    assert len(xs) == 200
    assert len(pairs(xs)) == 200


@pytest.mark.parametrize("domain", ALL_DOMAINS)
def test_answers_are_short(domain):
    for ex in generate(domain, 300) + generate(domain, 100, split="eval"):
        assert ex.output == ex.output.strip() and "\n" not in ex.output
        assert len(ex.output) <= 30 and len(ex.output.split()) <= 5, ex
        assert ex.instruction  # never a plain-text example
        assert normalize_answer(ex.output) == ex.output  # exact match can hit it verbatim


def test_generate_argument_errors():
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        generate("poetry", 3)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        generate("code", 3, split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`n` must be an integer >= 0"):
        generate("code", -1)
    with pytest.raises(ValueError, match="domain 'facts' has only 960 distinct train examples"):
        generate("facts", 961)
    with pytest.raises(ValueError, match="only 480 distinct eval"):
        generate("facts", 481, split="eval")
    assert len(generate("facts", 960)) == 960


def test_generate_federation():
    fed = generate_federation(30, 10, seed=2, n_ood_eval=5)
    assert list(fed.train) == list(DOMAINS) == list(fed.eval)
    assert list(fed.ood) == list(OOD_DOMAINS)
    assert [len(c) for c in fed.clients()] == [30] * len(DOMAINS)
    assert all(len(v) == 10 for v in fed.eval.values())
    assert len(fed.ood["counting"]) == 5
    assert fed.train["code"] == generate("code", 30, seed=2)
    assert fed.ood["counting"] == generate("counting", 5, seed=2, split="eval")
    assert list(generate_federation(1, 1, domains=("rewrite", "code")).train) == ["rewrite", "code"]


# --------------------------------------------------------------------------------------------
# domains: every answer re-derived from the question


def sample(domain: str) -> list[Example]:
    return generate(domain, 250, seed=5) + generate(domain, 100, seed=5, split="eval")


def test_arithmetic_answers():
    for ex in sample("arithmetic"):
        text = question(ex)
        x, y = (int(v) for v in re.findall(r"\d+", text)[:2])
        lower = text.lower()
        if "each" in lower:
            expected = x * y
        elif any(w in lower for w in ("left", "remain", "fewer")):
            expected = x - y
        else:
            expected = x + y
        assert ex.output == str(expected), ex
        assert len(re.findall(r"\d+", text)) == 2, ex


def test_code_answers():
    builtins = {"max": max, "min": min, "sum": sum, "len": len, "sorted": sorted}
    for ex in sample("code"):
        instr = ex.instruction.lower()
        if "expression" in instr:
            m = re.search(r"`(.+)`", ex.instruction)
            expr = m.group(1) if m else ex.input
            expected = repr(eval(expr, {"__builtins__": builtins}))
        elif "snake_case" in instr and "camelcase" in instr:
            if instr.index("snake_case") < instr.index("camelcase"):
                head, *rest = ex.input.split("_")
                expected = head + "".join(w[0].upper() + w[1:] for w in rest)
            else:
                expected = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), ex.input)
        else:
            values = json.loads(ex.input)
            if "reverse" in instr:
                expected = str(list(reversed(values)))
            elif "descending" in instr or "largest to smallest" in instr:
                expected = str(sorted(values)[::-1])
            elif "ascending" in instr or "smallest to largest" in instr:
                expected = str(sorted(values))
            else:
                assert "how many elements" in instr or "length" in instr, ex
                expected = str(len(values))
        assert ex.output == expected, ex


def test_facts_answers_come_from_one_fixed_world():
    table = fact_table()
    assert len(table) == 40
    countries = [row["country"] for row in table]
    assert len(set(countries)) == 40
    assert all(a not in b for a in countries for b in countries if a != b)
    values = [row[k] for row in table for k in FACT_ATTRIBUTES]
    assert len(set(values)) == len(values)  # every answer names exactly one thing
    by_country = {row["country"]: row for row in table}
    for ex in generate("facts", 300, seed=9) + generate("facts", 200, seed=9, split="eval"):
        text = ex.instruction + " " + ex.input
        named = [c for c in countries if c in text]
        assert len(named) == 1, ex
        # Longest phrase first: "official language" before a shorter phrase it contains.
        attr = next(
            k
            for k, phrase in sorted(FACT_ATTRIBUTES.items(), key=lambda kv: -len(kv[1]))
            if phrase in text
        )
        assert ex.output == by_country[named[0]][attr], ex
    assert fact_table() == table  # no seed, no state: the world never changes


def test_facts_train_covers_every_fact_and_eval_phrasings_are_held_out():
    train = generate("facts", 160, seed=4)
    # The first 160 training examples are the 160 facts (40 countries x 4), one each, so
    # every eval answer has been taught.
    assert len({e.output for e in train}) == 160
    evals = generate("facts", 480, split="eval")
    assert {e.output for e in evals} <= {e.output for e in train}

    # Eval phrasings never occur in training: compare the templates with the country blanked.
    countries = [row["country"] for row in fact_table()]

    def shapes(examples: list[Example]) -> set[str]:
        out = set()
        for e in examples:
            text = e.instruction + "|" + e.input
            for c in countries:
                text = text.replace(c, "<C>")
            out.add(text)
        return out

    train_shapes, eval_shapes = shapes(generate("facts", 960)), shapes(evals)
    assert len(train_shapes) == 6 * 4 and len(eval_shapes) == 3 * 4
    assert not train_shapes & eval_shapes


IRREGULAR_PLURALS = {
    "leaf": "leaves", "knife": "knives", "wolf": "wolves", "shelf": "shelves", "loaf": "loaves",
    "half": "halves", "life": "lives", "potato": "potatoes", "tomato": "tomatoes",
    "hero": "heroes", "echo": "echoes", "child": "children", "mouse": "mice", "goose": "geese",
    "man": "men", "woman": "women", "tooth": "teeth", "foot": "feet", "person": "people",
    "ox": "oxen", "sheep": "sheep", "deer": "deer", "fish": "fish", "moose": "moose",
}  # fmt: skip


def plural(word: str) -> str:
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def test_rewrite_answers():
    seen_ops = set()
    for ex in sample("rewrite") + generate("rewrite", 600, seed=11):
        instr, text, words = ex.instruction.lower(), ex.input, ex.input.split()
        if "plural" in instr:
            op, expected = "plural", plural(text)
        elif "acronym" in instr or "initials" in instr:
            op, expected = "acronym", "".join(w[0].upper() for w in words)
        elif "vowel" in instr:
            op, expected = "no_vowels", re.sub("[aeiou]", "", text)
        elif "title case" in instr or "first letter of every word" in instr:
            op, expected = "title", " ".join(w[0].upper() + w[1:] for w in words)
        elif "uppercase" in instr or "capital letters" in instr:
            op, expected = "upper", text.upper()
        elif "backwards" in instr or "letters of the word" in instr:
            op, expected = "spell_back", "".join(reversed(text))
        else:
            assert "words" in instr and "reverse" in instr, ex
            op, expected = "reverse_words", " ".join(words[::-1])
        seen_ops.add(op)
        assert ex.output == expected, ex
    assert len(seen_ops) == 7


def test_counting_answers():
    for ex in sample("counting"):
        instr = ex.instruction
        if "words" in instr:
            expected = len(ex.input.split())
        elif "vowels" in instr:
            word = ex.input or re.findall(r"'(\w+)'", instr)[0]
            expected = sum(word.count(v) for v in "aeiou")
        else:
            quoted = re.findall(r"'(\w+)'", instr)
            letter, word = quoted[0], (ex.input or quoted[1])
            expected = word.count(letter)
        assert ex.output == str(expected), ex
    assert generate("counting", 1, seed=0) != []


# --------------------------------------------------------------------------------------------
# io


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_save_and_load_round_trip(tmp_path):
    examples = [*generate("code", 20), Example("Dis «bonjour».", "", "bonjour ✓", "fr")]
    path = tmp_path / "sub" / "data.jsonl"
    save_jsonl(examples, path)
    assert load_examples(path) == examples
    assert load_examples(str(path)) == examples
    save_jsonl(examples[:3], path)  # overwrite in place
    assert load_examples(path) == examples[:3]
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.jsonl"]  # no temp left


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    save_jsonl([Example("a", "", "b")], path)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)  # the module's os is this os
    with pytest.raises(OSError, match="disk full"):
        save_jsonl([Example("c", "", "d")], path)
    assert load_examples(path) == [Example("a", "", "b")]
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]
    with pytest.raises(ValueError, match="no examples to save"):
        save_jsonl([], tmp_path / "empty.jsonl")


def test_load_jsonl_defaults_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(
        b'\xef\xbb\xbf{"instruction": "i1", "output": "o1"}\r\n\r\n'
        b'  \n{"instruction": "i2", "input": "x", "output": "o2", "domain": "d", "k": [1]}\n'
    )
    assert load_examples(path) == [Example("i1", "", "o1"), Example("i2", "x", "o2", "d")]


def test_load_json_array(tmp_path):
    items = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "output": "d"}]
    path = write(tmp_path / "alpaca.json", json.dumps(items, indent=2))
    assert load_examples(path) == [Example("a", "", "b"), Example("c", "", "d")]
    path = write(tmp_path / "bad.json", json.dumps([items[0], {"instruction": "c"}]))
    with pytest.raises(DataError, match=r"bad\.json: item 1: missing field 'output'"):
        load_examples(path)


def test_load_plain_text(tmp_path):
    path = write(
        tmp_path / "corpus.txt", "\n\nFirst doc\nline two.\n \t\nSecond doc.\n\n\n\nThird.\n"
    )
    assert load_examples(path) == [
        Example("", "", "First doc\nline two."),
        Example("", "", "Second doc."),
        Example("", "", "Third."),
    ]
    assert prompt_and_response(load_examples(path)[0]) == ("", "First doc\nline two.")
    with pytest.raises(DataError, match=r"empty\.md: no examples"):
        load_examples(write(tmp_path / "empty.md", "\n  \n\n"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", ": no examples"),
        ("\n   \n", ": no examples"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": ', ":2: invalid JSON: "),
        ('{"instruction": "a", "output": "b"}\n\n[1]\n', ":3: expected a JSON object, got array"),
        ('"text"\n', ":1: expected a JSON object, got string"),
        ('{"instruction": "a"}\n', ":1: missing field 'output'"),
        ('{"output": "a"}\n', ":1: missing field 'instruction'"),
        ('{"instruction": "a", "output": 5}\n', ":1: field 'output' must be a string, got number"),
        ('{"instruction": "a", "input": null, "output": "b"}', ":1: field 'input' must be a str"),
        ('{"instruction": "a", "output": "  "}\n', ":1: field 'output' is empty"),
        ('{"instruction": "", "input": "x", "output": "b"}', ":1: field 'instruction' is empty"),
    ],
)
def test_load_errors_name_file_and_line(tmp_path, content, message):
    path = write(tmp_path / "data.jsonl", content)
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert str(info.value).startswith(str(path) + message), str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_unreadable_files(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"cannot read .*nope\.jsonl: "):
        load_examples(missing)
    with pytest.raises(DataError, match="cannot read "):
        load_examples(tmp_path)  # a directory
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match=r"cannot read .*bin\.txt: .*utf-8"):
        load_examples(binary)


# --------------------------------------------------------------------------------------------
# partitions


def pool(n_per_domain: int = 50) -> list[Example]:
    return [e for d in ALL_DOMAINS for e in generate(d, n_per_domain, seed=1)]


def assert_exact_cover(clients: list[list[Example]], examples: list[Example]) -> None:
    flat = [e for c in clients for e in c]
    assert Counter(flat) == Counter(examples)
    assert len(flat) == len(examples)


def test_partition_by_domain():
    examples = pool(10)
    clients = partition_by_domain(examples)
    assert [c[0].domain for c in clients] == sorted(ALL_DOMAINS)
    assert_exact_cover(clients, examples)
    assert all(len({e.domain for e in c}) == 1 for c in clients)
    ordered = partition_by_domain(examples, ["rewrite", "counting", "facts", "code", "arithmetic"])
    assert [c[0].domain for c in ordered] == ["rewrite", "counting", "facts", "code", "arithmetic"]
    assert ordered[0] == [e for e in examples if e.domain == "rewrite"]  # input order kept
    with pytest.raises(ValueError, match="'counting' is not in domains"):
        partition_by_domain(examples, list(DOMAINS))
    with pytest.raises(ValueError, match="no examples for domain"):
        partition_by_domain(examples, [*ALL_DOMAINS, "poetry"])
    with pytest.raises(ValueError, match="duplicate"):
        partition_by_domain(examples, [*ALL_DOMAINS, "code"])


def test_partition_iid():
    examples = pool(21)
    clients = partition_iid(examples, 4, seed=3)
    assert_exact_cover(clients, examples)
    sizes = [len(c) for c in clients]
    assert max(sizes) - min(sizes) <= 1
    assert clients == partition_iid(examples, 4, seed=3)
    assert clients != partition_iid(examples, 4, seed=4)
    # Shuffled: each client sees several domains.
    assert all(len({e.domain for e in c}) >= 3 for c in clients)
    assert [len(c) for c in partition_iid(examples[:2], 3)] == [1, 1, 0]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_clients"):
            partition_iid(examples, bad)  # type: ignore[arg-type]


def test_partition_dirichlet_cover_and_determinism():
    examples = pool(40)
    clients = partition_dirichlet(examples, 6, 0.5, seed=2)
    assert len(clients) == 6
    assert_exact_cover(clients, examples)
    assert clients == partition_dirichlet(examples, 6, 0.5, seed=2)
    assert clients != partition_dirichlet(examples, 6, 0.5, seed=3)
    by_length = partition_dirichlet(examples, 3, 1.0, label=lambda e: str(len(e.output) % 3))
    assert_exact_cover(by_length, examples)


def test_partition_dirichlet_skew_follows_alpha():
    examples = pool(100)  # 5 labels x 100
    n_clients = 5

    def top_shares(clients: list[list[Example]]) -> list[float]:
        per_label: dict[str, Counter[int]] = {}
        for i, c in enumerate(clients):
            for e in c:
                per_label.setdefault(e.domain, Counter())[i] += 1
        return [max(cnt.values()) / sum(cnt.values()) for cnt in per_label.values()]

    skewed = partition_dirichlet(examples, n_clients, 0.01, seed=0)
    assert min(top_shares(skewed)) > 0.9  # each label sits (almost) on one client
    uniform = partition_dirichlet(examples, n_clients, 1e5, seed=0)
    assert max(top_shares(uniform)) < 0.23  # ~0.2 each
    assert all(abs(len(c) - 100) <= 5 for c in uniform)
    # alpha so small that every gamma draw underflows: the one-hot limit, still a full cover.
    extreme = partition_dirichlet(examples, n_clients, 1e-300, seed=0)
    assert_exact_cover(extreme, examples)
    assert min(top_shares(extreme)) == 1.0


def test_partition_dirichlet_errors():
    for alpha in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            partition_dirichlet(pool(2), 3, alpha)
    with pytest.raises(ValueError, match="n_clients"):
        partition_dirichlet(pool(2), 0, 1.0)


# --------------------------------------------------------------------------------------------
# metrics


def test_normalize_and_exact_match():
    assert normalize_answer("  42.  ") == "42"
    assert normalize_answer("Mount   Kelvar\t.") == "Mount Kelvar"
    assert normalize_answer("[1,  2, 3]") == "[1, 2, 3]"
    assert normalize_answer("wait..") == "wait."
    assert exact_match(" 12.", "12")
    assert exact_match("getUserName", "getUserName")
    assert not exact_match("getusername", "getUserName")  # case-sensitive on purpose
    assert not exact_match("12", "13")
    assert not exact_match("", "0")


def test_first_line():
    assert first_line("42\n### Instruction:\nmore") == "42"
    assert first_line("42") == "42"
    assert first_line("\n\n  7\r\nrest") == "  7"
    assert first_line("") == ""
    assert first_line("\n \n") == ""
    assert exact_match(first_line("Mount Temor.\nNext"), "Mount Temor")


def test_generated_examples_score_against_themselves():
    fed = generate_federation(5, 5)
    for ex in [e for xs in (*fed.eval.values(), *fed.ood.values()) for e in xs]:
        prompt, reference = prompt_and_response(ex)
        assert prompt.endswith("### Response:\n")
        assert exact_match(first_line(reference + "\n### junk"), reference)


# --- chat and prompt-completion records, tables -----------------------------------------------


def test_chat_and_prompt_completion_lines_load(tmp_path):
    lines = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome"},
            ],
            "domain": "geo",
        },
        {"prompt": "Say hi", "completion": "hi"},
        {"instruction": "i", "output": "o"},
    ]
    path = write(tmp_path / "mixed.jsonl", "\n".join(json.dumps(x) for x in lines))
    assert load_examples(path) == [
        Example("2+2?", "", "4"),
        Example(
            "Be brief.\n\nAnd of Italy?",
            "User: Capital of France?\nAssistant: Paris",
            "Rome",
            "geo",
        ),
        Example("Say hi", "", "hi"),
        Example("i", "", "o"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"messages": []}', ":2: field 'messages' must be a non-empty array"),
        ('{"messages": [{"role": "user", "content": "x"}]}', ":2: messages must end with a user"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', ":2: messages[0]: role must be one"),
        ('{"messages": [{"role": "user", "content": 1}]}', ":2: messages[0]: content must be a"),
        ('{"prompt": "x"}', ":2: missing field 'completion'"),
        ('{"prompt": [{"role": "user"}], "completion": "y"}', ":2: field 'prompt' must be a str"),
        ('{"text": "just text"}', ":2: unrecognised record (keys 'text'): expected"),
    ],
)
def test_unusable_records_name_the_line(tmp_path, line, message):
    path = write(tmp_path / "data.jsonl", '{"prompt": "p", "completion": "c"}\n' + line)
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert str(info.value).startswith(str(path) + message), str(info.value)


def test_a_csv_is_refused_not_read_as_one_document(tmp_path):
    path = write(tmp_path / "data.csv", "instruction,output\nsay hi,hi\nsay bye,bye\n")
    with pytest.raises(DataError, match=r"data\.csv:1: \.csv files are not read.*JSON object"):
        load_examples(path)
