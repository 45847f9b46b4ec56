"""Which config keys a report groups on: by default the keys that differ between the runs, minus the
seed (what the statistic is over), keys of how/where a run executed, and keys that follow from others.
"""
from __future__ import annotations

import difflib
from typing import Any, Sequence

from transfer_cli.errors import TransferCliError
from transfer_cli.reporting.runs import Run

SAMPLES_KEY = "data.samples_per_class"
STRATEGY_KEY = "strategy.name"
# Keys that never define an experiment: the seed (what the statistic is over), names derived from
# other keys, and how/where a run executed (resuming, skipping, device, threads, logging, workers).
IGNORED_KEYS = frozenset({"seed", "name", "trainer.resume", "trainer.skip_done", "trainer.device",
                          "trainer.num_threads", "trainer.progress", "trainer.log_every",
                          "trainer.eval_batch_size", "data.num_workers"})
# results.json's `weights` (where the body's weights came from) joins a done run's keys as weights.*: a
# grouping key on request (--by weights.source), not by default (failed runs have no results.json)
IGNORED_PREFIXES = ("logger.", "weights.")
# Grouping keys come first in this order (then in config order): table columns and sort order.
FIRST_KEYS = ("data.name", "backbone.name", SAMPLES_KEY, STRATEGY_KEY)


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (missing counts as a value), ignored keys
    left out, in table order."""
    keys = list(dict.fromkeys(k for run in runs for k in run.config))
    varying = [k for k in keys if len({run.config.get(k) for run in runs}) > 1
               and k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)]
    first = [k for k in FIRST_KEYS if k in varying]
    return first + [k for k in varying if k not in first]


def default_keys(runs: Sequence[Run]) -> tuple[list[str], list[str]]:
    """(grouping keys, varying keys left out because a grouping key already fixes their value).

    `strategy.alpha` exists only for l2sp and follows from `strategy.name`; with an experiment sweep
    `data.root` follows from `data.name`. Grouping on them would add columns, not groups.
    """
    kept: list[str] = []
    follow: list[str] = []
    for key in varying_keys(runs):
        (follow if any(_determines(runs, k, key) for k in kept) else kept).append(key)
    return kept, follow


def _determines(runs: Sequence[Run], key: str, other: str) -> bool:
    """True when every value of `key` comes with a single value of `other`."""
    seen: dict[Any, Any] = {}
    for run in runs:
        value, other_value = run.config.get(key), run.config.get(other)
        if seen.setdefault(value, other_value) != other_value:
            return False
    return True


def check_keys(keys: Sequence[str], runs: Sequence[Run]) -> None:
    known = list(dict.fromkeys(k for run in runs for k in run.config))
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            varying = ", ".join(varying_keys(runs)) or "none"
            raise TransferCliError(f"unknown --by key {key!r}; {hint}keys that vary across these runs: {varying} "
                                   "(any key of .hydra/config.yaml works, e.g. optim.lr)")

