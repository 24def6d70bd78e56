"""Splitting a pool of examples across federated clients: by domain, IID, or Dirichlet.

Every function assigns each input example to exactly one client, never copies or drops one,
and is deterministic given its arguments (its own seeded ``random.Random``; no global state).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from fedsrd_core.data.examples import Example


def _domain_label(ex: Example) -> str:
    return ex.domain


def _check_clients(n_clients: int) -> None:
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"`n_clients` must be an integer >= 1, got {n_clients!r}")


def partition_by_domain(
    examples: Sequence[Example], domains: Sequence[str] | None = None
) -> list[list[Example]]:
    """One client per domain: client ``i`` holds the examples of ``domains[i]``.

    Args:
        examples: the pool; the input order is kept within each client.
        domains: client order; default: the sorted distinct ``domain`` values of ``examples``.

    Raises:
        ValueError: a duplicate in ``domains``, a listed domain without examples (a client
            with nothing to train on), or an example whose domain is not listed (it would be
            silently dropped otherwise).
    """
    if domains is None:
        domains = sorted({ex.domain for ex in examples})
    if len(set(domains)) != len(domains):
        raise ValueError(f"duplicate domains in {list(domains)!r}")
    clients: dict[str, list[Example]] = {d: [] for d in domains}
    for ex in examples:
        if ex.domain not in clients:
            raise ValueError(f"example of domain {ex.domain!r} is not in domains {list(domains)!r}")
        clients[ex.domain].append(ex)
    empty = [d for d, xs in clients.items() if not xs]
    if empty:
        raise ValueError(f"no examples for domain(s) {empty!r}")
    return list(clients.values())


def partition_iid(
    examples: Sequence[Example], n_clients: int, *, seed: int = 0
) -> list[list[Example]]:
    """Shuffle, then deal round-robin: client sizes differ by at most one.

    With fewer examples than clients, the last clients are empty.
    """
    _check_clients(n_clients)
    pool = list(examples)
    random.Random(f"fedsrd-partition-iid/{seed}").shuffle(pool)
    return [pool[i::n_clients] for i in range(n_clients)]


def _dirichlet(rng: random.Random, alpha: float, k: int) -> list[float]:
    """One draw of a symmetric Dirichlet(alpha) over ``k`` parts, via normalised gammas."""
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(k)]
    total = sum(draws)
    if total <= 0.0 or not math.isfinite(total):
        # For tiny alpha every gamma draw can underflow to 0.0; the Dirichlet then tends to a
        # one-hot vector on a uniformly chosen part, which is what we return.
        one_hot = [0.0] * k
        one_hot[rng.randrange(k)] = 1.0
        return one_hot
    return [d / total for d in draws]


def _apportion(n: int, shares: Sequence[float]) -> list[int]:
    """Integer counts summing to ``n``, closest to ``n * shares`` (largest remainder)."""
    exact = [n * s for s in shares]
    counts = [math.floor(x) for x in exact]
    # Ties broken by client index, so the result does not depend on float sorting quirks.
    order = sorted(range(len(shares)), key=lambda j: (-(exact[j] - counts[j]), j))
    for j in order[: n - sum(counts)]:
        counts[j] += 1
    return counts


def partition_dirichlet(
    examples: Sequence[Example],
    n_clients: int,
    alpha: float,
    *,
    seed: int = 0,
    label: Callable[[Example], str] = _domain_label,
) -> list[list[Example]]:
    """Label-skewed split: per label, client shares drawn from a symmetric Dirichlet(alpha).

    The usual non-IID benchmark split: small ``alpha`` (e.g. 0.1) gives each label mostly to
    one or two clients, large ``alpha`` (e.g. 100) approaches an IID split. For each label
    (in sorted order) the shares are drawn with ``random.gammavariate`` and turned into
    integer counts by largest remainder, so every example goes to exactly one client. Each
    client's list is shuffled. Clients may end up empty for small ``alpha``.

    Args:
        examples: the pool.
        n_clients: number of clients (>= 1).
        alpha: Dirichlet concentration (> 0).
        seed: seed of the draws and shuffles.
        label: the class an example belongs to (default: its ``domain``).
    """
    _check_clients(n_clients)
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"`alpha` must be a finite number > 0, got {alpha!r}")
    rng = random.Random(f"fedsrd-partition-dirichlet/{seed}")
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(label(ex), []).append(ex)
    clients: list[list[Example]] = [[] for _ in range(n_clients)]
    # Sorted labels: which label takes the first draws must not depend on input order.
    for name in sorted(groups):
        group = groups[name]
        rng.shuffle(group)
        counts = _apportion(len(group), _dirichlet(rng, float(alpha), n_clients))
        start = 0
        for client, count in zip(clients, counts, strict=True):
            client.extend(group[start : start + count])
            start += count
    for client in clients:
        rng.shuffle(client)
    return clients
