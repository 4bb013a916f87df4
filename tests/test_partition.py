"""Non-IID partitions by meaning-representation attributes: both E2E spellings parse, every example lands at
exactly one client, small alpha concentrates each attribute combination, large alpha spreads it."""
from __future__ import annotations

from collections import Counter

import pytest

from common.data import Example, synthetic_e2e
from common.partition import attributes, dirichlet_partition, group_key, partition


def test_both_spellings_of_the_meaning_representation() -> None:
    e2e = "name : Alimentum | area : city centre | eat type : pub | family friendly : no"
    assert attributes(e2e) == {"name": "Alimentum", "area": "city centre", "eattype": "pub", "familyfriendly": "no"}
    assert attributes("name[Aromi], eatType[coffee shop], food[Chinese]") == \
        {"name": "Aromi", "eattype": "coffee shop", "food": "Chinese"}
    assert group_key(Example(e2e, "x")) == ("pub", "-", "city centre")
    assert attributes(None) == {}


def _skew(parts: list[list[int]], examples: list[Example]) -> float:
    """Mean over attribute combinations of the largest share one client holds."""
    owner = {i: c for c, part in enumerate(parts) for i in part}
    by_key: dict[tuple, Counter] = {}
    for i, ex in enumerate(examples):
        by_key.setdefault(group_key(ex), Counter())[owner[i]] += 1
    return sum(max(c.values()) / sum(c.values()) for c in by_key.values()) / len(by_key)


def test_dirichlet_partition_covers_everything_and_alpha_controls_skew() -> None:
    examples = synthetic_e2e(600, seed=3)
    skewed = dirichlet_partition(examples, 3, alpha=0.05, seed=1, min_size=10)
    spread = dirichlet_partition(examples, 3, alpha=100.0, seed=1, min_size=10)
    for parts in (skewed, spread):
        assert sorted(i for p in parts for i in p) == list(range(600))
        assert min(len(p) for p in parts) >= 10
    assert _skew(skewed, examples) > 0.85 > 0.6 > _skew(spread, examples)
    assert dirichlet_partition(examples, 3, 0.05, seed=1) == dirichlet_partition(examples, 3, 0.05, seed=1)


def test_iid_partition_is_the_shards_and_bad_settings_are_refused() -> None:
    examples = synthetic_e2e(10, seed=0)
    assert partition(examples, 3) == [examples[0::3], examples[1::3], examples[2::3]]
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(examples, 3, alpha=0.0)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(examples, 3, alpha=1.0, min_size=5)
    with pytest.raises(ValueError, match="scheme"):
        partition(examples, 3, scheme="zipf")
