"""A short, seeded run of the fuzz suite (tests/support/fuzz.py); `make fuzz` runs the long one."""

from __future__ import annotations

from tests.support import fuzz

PER_FAMILY = 8  # 40 cases, about two minutes on two cores


def test_short_fuzz_run_has_no_failure(tiny_bundle, tiny_mm_checkpoint):
    outcomes = fuzz.run(tiny_bundle, tiny_mm_checkpoint, PER_FAMILY, seed=7)
    assert len(outcomes) == PER_FAMILY * len(fuzz.FAMILIES)
    failures = [f"{o.case.family}: {o.case.label}: {o.detail}" for o in outcomes if o.verdict == "failure"]
    assert failures == [], "\n".join(failures)
    # Damaged bundle files are always refused; every family reaches a clean error at least once.
    assert all(o.verdict == "clean error" for o in outcomes if o.case.family == "bundle folders" and not o.case.may_run)
    assert {o.case.family for o in outcomes if o.verdict == "clean error"} == set(fuzz.FAMILIES)


def test_cases_are_reproducible(tiny_bundle, tiny_mm_checkpoint, tmp_path):
    import random

    for i, (make, source) in enumerate(fuzz.FAMILIES.values()):
        src = tiny_bundle if source == "bundle" else tiny_mm_checkpoint
        a = make(random.Random("3:x"), src, tmp_path / f"{i}a")
        b = make(random.Random("3:x"), src, tmp_path / f"{i}b")
        assert a.label == b.label and a.may_run == b.may_run
