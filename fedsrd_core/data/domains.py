"""Deterministic synthetic instruction-tuning domains, one federated client per domain.

Four training domains with distinct structure and one held-out out-of-domain task. Every
answer is short (a few tokens) so that greedy decoding can be scored by exact match.

* ``arithmetic``: word problems with small integers (add, subtract, multiply).
* ``code``: list reversal and sorting, ``len``, tiny Python expressions, snake_case <->
  camelCase; the answer is the exact result text (Python ``repr`` for lists).
* ``facts``: look-ups in a fictional world (40 invented countries with capital, currency,
  official language and highest mountain), generated once from a fixed world seed.
* ``rewrite``: uppercase, title case, reverse word order, pluralize, remove vowels, spell
  backwards, acronyms.
* ``counting`` (out of domain, never trained on): letters, vowels and words to count.

Determinism: every call seeds its own ``random.Random`` with a string built from
``(domain, seed, split)``. String seeds go through SHA-512 inside ``random``, so they do not
depend on ``PYTHONHASHSEED`` or the platform, and nothing reads global random state.

Train/eval separation, by construction:

* ``arithmetic``, ``code``, ``rewrite``, ``counting``: each generated item has a *content key*
  (the underlying problem: operation and operands, without the phrasing, names or objects).
  A SHA-256 of ``(domain, key)`` puts about 20% of all keys in ``eval`` and the rest in
  ``train``; each split only keeps items whose key falls on its side. The phrasing is a
  function of the problem plus the template, so no (instruction, input) pair can be produced
  by both splits, for any two seeds, and eval problems are new problems (e.g. unseen operand
  pairs), not re-worded training ones.
* ``facts``: both splits ask about the SAME world and the SAME (country, attribute) facts;
  eval uses question templates that training never uses. Holding out whole (country,
  attribute) pairs would make eval unanswerable (nothing in training states those facts, and
  the answers are invented names), so exact match would be 0 for every method; held-out
  phrasings instead measure whether the federation learned the facts rather than memorised
  strings. Training cycles through all 160 facts before repeating one, so ``n >= 160`` train
  examples cover every fact that eval can ask about.

Within one call, examples are distinct (no repeated (instruction, input) pair). Asking for
more than a domain can supply (the facts domain has 960 train and 480 eval phrasings; the
others hold far more) raises ``ValueError``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

from fedsrd_core.data.examples import Example

DOMAINS: tuple[str, ...] = ("arithmetic", "code", "facts", "rewrite")
OOD_DOMAINS: tuple[str, ...] = ("counting",)

Split = Literal["train", "eval"]
_SPLITS: tuple[str, ...] = ("train", "eval")

# Share of content keys that belong to the eval split (out of 256 hash buckets): ~20%.
_EVAL_BUCKETS = 51

# One generator draw: the example and its content key (what the train/eval split hashes).
_Item = tuple[Example, Hashable]
_Generator = Callable[[random.Random], _Item]


def _key_split(domain: str, key: Hashable) -> str:
    """Which split a content key belongs to, from a platform-independent hash."""
    # repr of nested tuples of str/int is stable across platforms and Python versions,
    # unlike hash(), which is salted per process for strings.
    digest = hashlib.sha256(f"fedsrd-split-v1\x00{domain}\x00{key!r}".encode()).digest()
    return "eval" if digest[0] < _EVAL_BUCKETS else "train"


def _either_style(
    rng: random.Random, question: str, instructions: Sequence[str]
) -> tuple[str, str]:
    """Put ``question`` in the instruction, or in the input under a generic instruction.

    Mixing both shapes exercises both variants of the Alpaca template.
    """
    if rng.random() < 0.5:
        return question, ""
    return rng.choice(instructions), question


# --------------------------------------------------------------------------------------------
# arithmetic

_NAMES = (
    "Ava", "Ben", "Carla", "Dev", "Elif", "Farah", "Gus", "Hana", "Ivan", "Jonas", "Kofi",
    "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Victor",
    "Wen", "Yusuf", "Zoe",
)  # fmt: skip
_OBJECTS = (
    "apples", "marbles", "stickers", "pencils", "books", "coins", "shells", "cookies", "stamps",
    "balloons", "cards", "buttons", "crayons", "oranges", "beads", "rocks", "feathers",
    "candles", "toy cars", "postcards",
)  # fmt: skip

# Templates use {a}/{b} (two different names), {x}/{y} (operands, in this order) and {o}.
_ADD_TEMPLATES = (
    "{a} has {x} {o} and buys {y} more. How many {o} does {a} have now?",
    "{a} has {x} {o}. {b} gives {a} {y} more. How many {o} does {a} have now?",
    "There are {x} {o} in a box and {y} {o} on the table. How many {o} are there in total?",
    "{a} collected {x} {o} on Monday and {y} {o} on Tuesday. "
    "How many {o} did {a} collect altogether?",
    "{a} has {x} {o} and {b} has {y} {o}. How many {o} do they have together?",
)
_SUB_TEMPLATES = (
    "{a} has {x} {o} and gives {y} of them to {b}. How many {o} does {a} have left?",
    "A shelf holds {x} {o}. {a} takes {y} of them away. How many {o} remain on the shelf?",
    "{a} had {x} {o} and lost {y} of them. How many {o} does {a} have left?",
    "{a} has {x} {o}. {b} has {y} fewer {o} than {a}. How many {o} does {b} have?",
)
_MUL_TEMPLATES = (
    "{a} has {x} bags with {y} {o} in each bag. How many {o} does {a} have?",
    "There are {x} boxes and each box contains {y} {o}. How many {o} are there in all?",
    "{a} buys {x} packs of {o}. Each pack has {y} {o}. How many {o} did {a} buy?",
    "A hall has {x} rows with {y} {o} in each row. How many {o} are in the hall?",
)
_ARITH_INSTRUCTIONS = (
    "Solve the math word problem. Answer with a number only.",
    "Answer the question with a single number.",
    "Work out the answer to this word problem.",
)


def _arithmetic(rng: random.Random) -> _Item:
    op = rng.choice(("add", "sub", "mul"))
    if op == "add":
        x, y = rng.randint(2, 99), rng.randint(2, 99)
        template, answer = rng.choice(_ADD_TEMPLATES), x + y
    elif op == "sub":
        x = rng.randint(10, 99)
        y = rng.randint(1, x - 1)
        template, answer = rng.choice(_SUB_TEMPLATES), x - y
    else:
        x, y = rng.randint(2, 12), rng.randint(2, 12)
        template, answer = rng.choice(_MUL_TEMPLATES), x * y
    a, b = rng.sample(_NAMES, 2)
    question = template.format(a=a, b=b, x=x, y=y, o=rng.choice(_OBJECTS))
    instruction, input_ = _either_style(rng, question, _ARITH_INSTRUCTIONS)
    return Example(instruction, input_, str(answer), "arithmetic"), (op, x, y)


# --------------------------------------------------------------------------------------------
# code

_IDENT_WORDS = (
    "get", "set", "load", "save", "parse", "read", "write", "update", "user", "file", "path",
    "name", "count", "item", "index", "total", "value", "buffer", "token", "cache", "config",
    "node", "tree", "size", "key", "queue", "event", "handler", "http", "json", "url", "page",
    "record", "max", "min", "first", "last", "next", "row", "column",
)  # fmt: skip

_LIST_OPS: dict[str, tuple[str, ...]] = {
    "reverse": ("Reverse the following list.", "Reverse the order of the elements in this list."),
    "sort_asc": ("Sort the following list in ascending order.", "Sort this list from smallest to largest."),  # noqa: E501
    "sort_desc": ("Sort the following list in descending order.", "Sort this list from largest to smallest."),  # noqa: E501
    "length": ("How many elements are in this list?", "Return the length of the list."),
}  # fmt: skip
_EXPR_INSTRUCTIONS = ("Evaluate the Python expression.", "What does this Python expression return?")
_SNAKE_TO_CAMEL = (
    "Convert the identifier from snake_case to camelCase.",
    "Rewrite this snake_case name in camelCase.",
)
_CAMEL_TO_SNAKE = (
    "Convert the identifier from camelCase to snake_case.",
    "Rewrite this camelCase name in snake_case.",
)


def _small_list(rng: random.Random) -> list[int]:
    # 3 to 5 numbers below 21 keep the answer within ~15 tokens for common tokenizers.
    return [rng.randint(0, 20) for _ in range(rng.randint(3, 5))]


def _expression(rng: random.Random, values: list[int]) -> tuple[str, str, Hashable]:
    """A tiny Python expression over ``values``, its result text and its content key."""
    kind = rng.choice(("max", "min", "sum", "len", "sorted", "sorted_rev", "rev_slice", "item"))
    lit = repr(values)
    reducers: dict[str, Callable[[list[int]], int]] = {
        "max": max,
        "min": min,
        "sum": sum,
        "len": len,
    }
    if kind in reducers:
        return f"{kind}({lit})", str(reducers[kind](values)), (kind, tuple(values))
    if kind == "sorted":
        return f"sorted({lit})", repr(sorted(values)), (kind, tuple(values))
    if kind == "sorted_rev":
        result = repr(sorted(values, reverse=True))
        return f"sorted({lit}, reverse=True)", result, (kind, tuple(values))
    if kind == "rev_slice":
        return f"{lit}[::-1]", repr(values[::-1]), (kind, tuple(values))
    i = rng.randrange(len(values))
    return f"{lit}[{i}]", str(values[i]), (kind, tuple(values), i)


def _code(rng: random.Random) -> _Item:
    task = rng.choice(("list", "list", "expr", "expr", "to_camel", "to_snake"))
    if task == "list":
        op = rng.choice(tuple(_LIST_OPS))
        values = _small_list(rng)
        if op == "reverse":
            answer = repr(values[::-1])
        elif op == "sort_asc":
            answer = repr(sorted(values))
        elif op == "sort_desc":
            answer = repr(sorted(values, reverse=True))
        else:  # length
            answer = str(len(values))
        ex = Example(rng.choice(_LIST_OPS[op]), repr(values), answer, "code")
        return ex, (op, tuple(values))
    if task == "expr":
        expr, answer, key = _expression(rng, _small_list(rng))
        if rng.random() < 0.5:
            instruction, input_ = f"What does the Python expression `{expr}` evaluate to?", ""
        else:
            instruction, input_ = rng.choice(_EXPR_INSTRUCTIONS), expr
        return Example(instruction, input_, answer, "code"), ("expr", key)
    words = rng.sample(_IDENT_WORDS, rng.randint(2, 4))
    snake = "_".join(words)
    camel = words[0] + "".join(w.capitalize() for w in words[1:])
    if task == "to_camel":
        return Example(rng.choice(_SNAKE_TO_CAMEL), snake, camel, "code"), (task, snake)
    return Example(rng.choice(_CAMEL_TO_SNAKE), camel, snake, "code"), (task, snake)


# --------------------------------------------------------------------------------------------
# facts

_FACT_WORLD_SEED = "fedsrd-facts-world-v1"
_VOWELS = "aeiouy"
_N_COUNTRIES = 40
_SYLLABLES = (
    "ka", "zor", "vel", "mi", "tho", "ran", "quo", "bel", "dor", "fa", "lu", "nes", "tar",
    "gri", "mon", "sa", "pel", "or", "ux", "ven", "dal", "ko", "ris", "tem", "bra", "lo", "nax",
    "si", "gol", "fen", "hal", "ry", "wen", "cas", "ti", "mur", "eb", "ja", "pho", "sel",
)  # fmt: skip
_COUNTRY_ENDINGS = ("ia", "ania", "ora", "land", "mark", "istan", "ovia", "enia", "ard", "esh")
_CITY_ENDINGS = ("", "", "burg", "port", "holm", "grad", "ton", "mir", "vale")
_CURRENCY_ENDINGS = ("o", "in", "ar", "et", "ari", "ul")
_LANGUAGE_ENDINGS = ("ish", "ese", "ic", "an", "i", "ol")

# Attribute name (the key in fact_table rows) -> how questions name it.
FACT_ATTRIBUTES: dict[str, str] = {
    "capital": "capital",
    "currency": "currency",
    "language": "official language",
    "mountain": "highest mountain",
}

# (instruction, input) templates; {c} is the country, {attr} the attribute phrase. The train
# and eval sets are disjoint and no train template renders to an eval one (distinct words).
_FACT_TRAIN_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("What is the {attr} of {c}?", ""),
    ("Name the {attr} of {c}.", ""),
    ("In the country of {c}, what is the {attr}?", ""),
    ("{c} is a country. What is its {attr}?", ""),
    ("Answer the question about the fictional world.", "What is the {attr} of {c}?"),
    ("Give the {attr} of the following country.", "{c}"),
)
_FACT_EVAL_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("What is {c}'s {attr}?", ""),
    ("Tell me the {attr} of {c}.", ""),
    ("Look up the {attr} of the given country.", "{c}"),
)


@dataclass(frozen=True)
class _Fact:
    country: str
    attribute: str
    answer: str


def _make_world() -> tuple[dict[str, str], ...]:
    """The fictional world: one row per country, from the fixed world seed."""
    rng = random.Random(_FACT_WORLD_SEED)
    used: set[str] = set()

    def fresh(build: Callable[[], str]) -> str:
        # Every name is unique across the whole world, so each answer names one thing.
        while True:
            name = build()
            if name not in used:
                used.add(name)
                return name

    def root(k: int) -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(k))

    def join(stem: str, ending: str) -> str:
        # "tho" + "o" would read "thoo": a linking "n" between two vowels keeps the names
        # pronounceable ("thono", "Sanol").
        if stem[-1:] in _VOWELS and ending[:1] in _VOWELS:
            return stem + "n" + ending
        return stem + ending

    countries: list[str] = []
    while len(countries) < _N_COUNTRIES:
        name = fresh(lambda: join(root(2), rng.choice(_COUNTRY_ENDINGS)).capitalize())
        # No country name inside another: a question then names exactly one country (and
        # the tests can find it by substring search).
        if any(name in other or other in name for other in countries):
            continue
        countries.append(name)
    rows = []
    for country in countries:
        rows.append(
            {
                "country": country,
                "capital": fresh(lambda: join(root(2), rng.choice(_CITY_ENDINGS)).capitalize()),
                "currency": fresh(lambda: join(root(1), rng.choice(_CURRENCY_ENDINGS))),
                "language": fresh(
                    lambda: join(root(1), rng.choice(_LANGUAGE_ENDINGS)).capitalize()
                ),
                "mountain": fresh(lambda: "Mount " + root(2).capitalize()),
            }
        )
    return tuple(rows)


_WORLD = _make_world()
_FACTS: tuple[_Fact, ...] = tuple(
    _Fact(row["country"], attr, row[attr]) for row in _WORLD for attr in FACT_ATTRIBUTES
)


def fact_table() -> list[dict[str, str]]:
    """The fictional world of the facts domain: one dict per country (a fresh copy).

    Keys: ``country`` and the keys of ``FACT_ATTRIBUTES`` (``capital``, ``currency``,
    ``language``, ``mountain``). It does not depend on any generation seed.
    """
    return [dict(row) for row in _WORLD]


def _facts(n: int, rng: random.Random, split: str) -> list[Example]:
    """``n`` distinct fact questions; each pass covers every fact once before any repeats."""
    templates = _FACT_TRAIN_TEMPLATES if split == "train" else _FACT_EVAL_TEMPLATES
    capacity = len(_FACTS) * len(templates)
    if n > capacity:
        raise ValueError(
            f"domain 'facts' has only {capacity} distinct {split} examples, asked for {n}"
        )
    # A random template order per fact; pass k uses the k-th template of every fact, so no
    # (fact, template) pair repeats and the first len(_FACTS) examples cover all facts.
    orders = [rng.sample(range(len(templates)), len(templates)) for _ in _FACTS]
    out: list[Example] = []
    for k in range(len(templates)):
        for i in rng.sample(range(len(_FACTS)), len(_FACTS)):
            if len(out) == n:
                return out
            fact = _FACTS[i]
            instruction, input_ = templates[orders[i][k]]
            fields = {"c": fact.country, "attr": FACT_ATTRIBUTES[fact.attribute]}
            out.append(
                Example(instruction.format(**fields), input_.format(**fields), fact.answer, "facts")
            )
    return out


# --------------------------------------------------------------------------------------------
# rewrite

_ADJECTIVES = (
    "quiet", "bright", "small", "green", "silver", "rapid", "gentle", "cold", "tall", "round",
    "sharp", "soft", "heavy", "golden", "narrow", "wild", "sunny", "dusty", "brave", "lucky",
    "plain", "crisp", "hollow", "smooth", "proud", "warm", "tiny", "bold", "calm", "dark",
)  # fmt: skip
_NOUNS = (
    "river", "lamp", "garden", "window", "forest", "engine", "candle", "harbor", "pencil",
    "mountain", "basket", "ladder", "planet", "rocket", "kettle", "castle", "meadow", "bridge",
    "tiger", "market", "signal", "button", "carpet", "island", "wagon", "violin", "mirror",
    "jacket", "tunnel", "compass", "spoon", "cloud", "stone", "train", "horse", "bottle",
    "dragon", "pillow", "thunder", "marble",
)  # fmt: skip
_VERBS = (
    "runs", "sings", "glows", "sleeps", "falls", "turns", "waits", "shines", "drifts", "rolls",
    "jumps", "hums", "spins", "grows", "melts", "breaks", "swims", "flies", "rests", "wanders",
)  # fmt: skip

# (singular, plural): regular, -es, consonant+y, vowel+y, f/fe -> ves, -o(es), irregular and
# unchanged nouns, so the task is not one rule.
_PLURALS = (
    ("cat", "cats"), ("dog", "dogs"), ("tree", "trees"), ("book", "books"), ("car", "cars"),
    ("door", "doors"), ("girl", "girls"), ("chair", "chairs"), ("river", "rivers"),
    ("apple", "apples"), ("garden", "gardens"), ("window", "windows"), ("planet", "planets"),
    ("box", "boxes"), ("bus", "buses"), ("church", "churches"), ("dish", "dishes"),
    ("fox", "foxes"), ("glass", "glasses"), ("watch", "watches"), ("brush", "brushes"),
    ("match", "matches"), ("wish", "wishes"), ("class", "classes"), ("bench", "benches"),
    ("city", "cities"), ("baby", "babies"), ("story", "stories"), ("party", "parties"),
    ("berry", "berries"), ("lady", "ladies"), ("puppy", "puppies"), ("cherry", "cherries"),
    ("country", "countries"), ("boy", "boys"), ("day", "days"), ("key", "keys"),
    ("toy", "toys"), ("valley", "valleys"), ("leaf", "leaves"), ("knife", "knives"),
    ("wolf", "wolves"), ("shelf", "shelves"), ("loaf", "loaves"), ("half", "halves"),
    ("life", "lives"), ("potato", "potatoes"), ("tomato", "tomatoes"), ("hero", "heroes"),
    ("echo", "echoes"), ("piano", "pianos"), ("photo", "photos"), ("child", "children"),
    ("mouse", "mice"), ("goose", "geese"), ("man", "men"), ("woman", "women"),
    ("tooth", "teeth"), ("foot", "feet"), ("person", "people"), ("ox", "oxen"),
    ("sheep", "sheep"), ("deer", "deer"), ("fish", "fish"), ("moose", "moose"),
)  # fmt: skip

_REWRITE_OPS: dict[str, tuple[str, ...]] = {
    "upper": ("Convert the phrase to uppercase.", "Rewrite the text in capital letters."),
    "title": ("Capitalize the first letter of every word.", "Write the phrase in title case."),
    "reverse_words": ("Reverse the order of the words.", "Write the words in reverse order."),
    "no_vowels": ("Remove all vowels from the text.", "Delete every vowel (a, e, i, o, u) from the text."),  # noqa: E501
    "spell_back": ("Spell the word backwards.", "Write the letters of the word in reverse order."),
    "acronym": ("Form an acronym from the first letter of each word, in uppercase.", "Write the uppercase initials of the words, with no spaces."),  # noqa: E501
    "plural": ("Give the plural form of the noun.", "What is the plural of this noun?"),
}  # fmt: skip


def _phrase(rng: random.Random) -> str:
    pattern = rng.choice(("AN", "AAN", "ANV", "AANV", "NV"))
    pools = {"A": _ADJECTIVES, "N": _NOUNS, "V": _VERBS}
    words: list[str] = []
    for slot in pattern:
        # Two adjectives in a row are kept distinct ("quiet quiet river" reads as a typo).
        choices = [w for w in pools[slot] if w not in words]
        words.append(rng.choice(choices))
    return " ".join(words)


def _rewrite(rng: random.Random) -> _Item:
    op = rng.choice(tuple(_REWRITE_OPS))
    instruction = rng.choice(_REWRITE_OPS[op])
    if op == "plural":
        singular, plural = rng.choice(_PLURALS)
        return Example(instruction, singular, plural, "rewrite"), (op, singular)
    if op == "spell_back":
        word = rng.choice(_NOUNS + _ADJECTIVES)
        return Example(instruction, word, word[::-1], "rewrite"), (op, word)
    text = _phrase(rng)
    words = text.split()
    if op == "upper":
        answer = text.upper()
    elif op == "title":
        answer = " ".join(w.capitalize() for w in words)
    elif op == "reverse_words":
        answer = " ".join(reversed(words))
    elif op == "no_vowels":
        # Every word in the pools has a consonant, so no word vanishes and no double space.
        answer = "".join(ch for ch in text if ch not in "aeiou")
    else:  # acronym
        answer = "".join(w[0] for w in words).upper()
    return Example(instruction, text, answer, "rewrite"), (op, text)


# --------------------------------------------------------------------------------------------
# counting (out of domain)

_COUNT_WORDS = (
    *_NOUNS,
    "banana", "mississippi", "committee", "balloon", "strawberry", "bookkeeper", "assessment",
    "parallel", "coffee", "letter", "pepper", "address", "success", "cinnamon", "tomorrow",
    "referee", "grammar", "occasion", "necessary", "accommodate", "butterfly", "chocolate",
    "umbrella", "elephant", "kangaroo", "pineapple", "volcano", "alphabet", "calendar",
    "dinosaur", "hippopotamus", "avocado", "broccoli", "spaghetti", "paradise", "mammal",
    "giraffe", "penguin", "sunflower", "possession",
)  # fmt: skip
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
_LETTER_INSTRUCTIONS = (
    "Count the occurrences of the letter '{l}' in the word.",
    "How many times does the letter '{l}' occur in the given word?",
)
_WORD_COUNT_INSTRUCTIONS = (
    "How many words are in the following sentence?",
    "Count the words in the text.",
)


def _counting(rng: random.Random) -> _Item:
    kind = rng.choice(("letter", "letter", "vowels", "words"))
    if kind == "words":
        words = [rng.choice(_COUNT_WORDS + _VERBS + _ADJECTIVES) for _ in range(rng.randint(3, 9))]
        text = " ".join(words)
        example = Example(rng.choice(_WORD_COUNT_INSTRUCTIONS), text, str(len(words)), "counting")
        return example, (kind, text)
    word = rng.choice(_COUNT_WORDS)
    if kind == "vowels":
        answer = sum(ch in "aeiou" for ch in word)
        if rng.random() < 0.5:
            instruction, input_ = f"How many vowels are in the word '{word}'?", ""
        else:
            instruction, input_ = "Count the vowels (a, e, i, o, u) in the word.", word
        return Example(instruction, input_, str(answer), "counting"), (kind, word)
    # Mostly a letter that occurs, drawn by position so repeated letters (the interesting
    # answers, 2..4) come up more often; sometimes one that does not occur (answer 0).
    if rng.random() < 0.85:
        letter = rng.choice(word)
    else:
        letter = rng.choice([ch for ch in _ALPHABET if ch not in word])
    if rng.random() < 0.5:
        instruction = f"How many times does the letter '{letter}' appear in '{word}'?"
        input_ = ""
    else:
        instruction, input_ = rng.choice(_LETTER_INSTRUCTIONS).format(l=letter), word
    return Example(instruction, input_, str(word.count(letter)), "counting"), (kind, word, letter)


# --------------------------------------------------------------------------------------------
# public API

_GENERATORS: dict[str, _Generator] = {
    "arithmetic": _arithmetic,
    "code": _code,
    "rewrite": _rewrite,
    "counting": _counting,
}


def generate(domain: str, n: int, *, seed: int = 0, split: Split = "train") -> list[Example]:
    """``n`` distinct examples of ``domain`` for ``split``, deterministic in the arguments.

    Args:
        domain: one of ``DOMAINS`` or ``OOD_DOMAINS``.
        n: number of examples (>= 0); no (instruction, input) pair repeats within the list.
        seed: generation seed; another seed gives another list from the same split.
        split: ``"train"`` or ``"eval"``. No (instruction, input) pair of one split can ever
            be produced by the other, whatever the seeds (see the module docstring).

    Raises:
        ValueError: unknown domain or split, a negative ``n``, or more examples than the
            domain can supply distinctly.
    """
    if domain not in DOMAINS and domain not in OOD_DOMAINS:
        known = ", ".join(DOMAINS + OOD_DOMAINS)
        raise ValueError(f"unknown domain {domain!r} (known: {known})")
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r} (expected 'train' or 'eval')")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"`n` must be an integer >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an integer, got {seed!r}")
    rng = random.Random(f"fedsrd-data-v1/{domain}/{seed}/{split}")
    if domain == "facts":
        return _facts(n, rng, split)

    gen = _GENERATORS[domain]
    out: list[Example] = []
    seen: set[tuple[str, str]] = set()
    # Rejection sampling: ~80% of draws fall in train, ~20% in eval, and duplicates are rare
    # for these pool sizes, so this budget is only exhausted when n truly exceeds the pool.
    budget = 50 * n + 1000
    for _ in range(budget):
        if len(out) == n:
            break
        example, key = gen(rng)
        pair = (example.instruction, example.input)
        if pair in seen or _key_split(domain, key) != split:
            continue
        seen.add(pair)
        out.append(example)
    if len(out) < n:
        raise ValueError(
            f"domain {domain!r} could only supply {len(out)} distinct {split} examples, "
            f"asked for {n}"
        )
    return out


@dataclass(frozen=True)
class Federation:
    """A ready federation: per-domain train and eval sets plus the out-of-domain eval sets.

    Attributes:
        train: domain -> training examples (one client per domain, in ``DOMAINS`` order).
        eval: domain -> held-out evaluation examples of the same domain.
        ood: out-of-domain task -> evaluation examples (never used for training).
    """

    train: dict[str, list[Example]]
    eval: dict[str, list[Example]]
    ood: dict[str, list[Example]]

    def clients(self) -> list[list[Example]]:
        """The training sets in domain order: client ``i`` trains on domain ``i``."""
        return list(self.train.values())


def generate_federation(
    n_train_per_domain: int,
    n_eval_per_domain: int,
    *,
    seed: int = 0,
    n_ood_eval: int | None = None,
    domains: Sequence[str] = DOMAINS,
) -> Federation:
    """Train and eval sets for every domain and the OOD eval sets, all from one seed.

    Args:
        n_train_per_domain: training examples per domain.
        n_eval_per_domain: evaluation examples per domain.
        seed: generation seed shared by every domain (each domain still gets its own stream).
        n_ood_eval: examples per out-of-domain task (default ``n_eval_per_domain``).
        domains: the training domains, in client order (default ``DOMAINS``).
    """
    if len(set(domains)) != len(domains):
        raise ValueError(f"duplicate domains in {list(domains)!r}")
    n_ood = n_eval_per_domain if n_ood_eval is None else n_ood_eval
    return Federation(
        train={d: generate(d, n_train_per_domain, seed=seed, split="train") for d in domains},
        eval={d: generate(d, n_eval_per_domain, seed=seed, split="eval") for d in domains},
        ood={d: generate(d, n_ood, seed=seed, split="eval") for d in OOD_DOMAINS},
    )
