"""Offline instruction-tuning data: examples, synthetic domains, file I/O, client partitions,
the Alpaca template and exact-match metrics. Pure standard library."""

from __future__ import annotations

from fedsrd_core.data.domains import (
    DOMAINS,
    FACT_ATTRIBUTES,
    OOD_DOMAINS,
    Federation,
    fact_table,
    generate,
    generate_federation,
)
from fedsrd_core.data.examples import Example
from fedsrd_core.data.io import DataError, load_examples, save_jsonl
from fedsrd_core.data.metrics import exact_match, first_line, normalize_answer
from fedsrd_core.data.partition import partition_by_domain, partition_dirichlet, partition_iid
from fedsrd_core.data.template import (
    HEADER_NO_INPUT,
    HEADER_WITH_INPUT,
    format_prompt,
    prompt_and_response,
    shortest_seq_len,
)

__all__ = [
    "DOMAINS",
    "FACT_ATTRIBUTES",
    "HEADER_NO_INPUT",
    "HEADER_WITH_INPUT",
    "OOD_DOMAINS",
    "DataError",
    "Example",
    "Federation",
    "exact_match",
    "fact_table",
    "first_line",
    "format_prompt",
    "generate",
    "generate_federation",
    "load_examples",
    "normalize_answer",
    "partition_by_domain",
    "partition_dirichlet",
    "partition_iid",
    "prompt_and_response",
    "save_jsonl",
    "shortest_seq_len",
]
