"""Corrupt saved states of a LogQuant context: refused with an error (or loaded into a consistent
cache), never a crash, and the context keeps working. The loads run in worker processes of
scripts/fuzz_state.py, so a crash fails a test instead of killing pytest; each case's result says
what the fuzzer checked (refusal, cache empty or as before, invariants of the 2-bit bookkeeping,
a decode with finite logits afterwards, the other sequences after a per-sequence restore)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import logquant_gguf

REPO = Path(__file__).resolve().parent.parent
FUZZ = REPO / "scripts" / "fuzz_state.py"


def run_fuzz(out: Path, *args: str) -> dict:
    # the package this test imported (a checkout's may have no library of its own)
    root = Path(logquant_gguf.__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(FUZZ), "--out", str(out), "--package-root", str(root), *args],
                       cwd=out.parent, capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"the fuzzer wrote no result (exit {r.returncode}):\n"
                    f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, dict]:
    """Every named case of the fuzzer (tiny models), run once: case name -> its result."""
    out = run_fuzz(tmp_path_factory.mktemp("fuzz") / "cases.json", "--cases", "all", "--confirm", "0")
    return {j["case"]: j for j in out["jobs"]}


def problems(cases: dict[str, dict], names: list[str]) -> dict[str, list[str]]:
    """What went wrong with each case (a crash, an expectation not met, a failed check)."""
    got = {n: cases[n].get("problems", ["no result"]) if n in cases else ["not run"] for n in names}
    return {n: p for n, p in got.items() if p}


def test_random_corruptions_never_crash_and_are_refused_or_consistent(tmp_path):
    """A few hundred random truncations, byte flips and targeted corruptions of real states (one
    sequence, one with 8-bit scales, several in one stream, a stream per sequence): no crash, no
    failed check, and the correct state loads again afterwards with its reference logits."""
    out = run_fuzz(tmp_path / "fuzz.json", "--n", "320", "--seed", "1", "--confirm", "3",
                   "--max-crashes", "10")
    s = out["summary"]
    detail = [{k: c.get(k) for k in ("index", "scenario", "mutation", "alone", "report")}
              for c in out["crashes"][:5]]
    assert s["crashed"] == 0 and s["hung"] == 0, json.dumps(detail, indent=1)[:4000]
    failed = [{k: j.get(k) for k in ("i", "scenario", "spec", "outcome", "fail", "reason")}
              for j in out["jobs"] if j.get("fail")]
    assert s["failed"] == 0, json.dumps(failed[:8], indent=1)[:4000]
    assert s["refused"] > 100 and s["accepted"] > 20  # both paths were exercised
    assert len(out["finals"]) == 5 and not any(f["fail"] for f in out["finals"]), out["finals"]


def test_corrupt_group_fill_is_refused(cases):
    """group_fill past the group (the staging read wrote past its vector), a full or empty open
    group, a negative fill: refused, cache empty or as before, context usable."""
    assert not problems(cases, ["fill_over_open", "fill_full_open", "fill_over_closed", "fill_negative",
                                "fill_zero_open", "open_group_last_full"])


def test_corrupt_slot_count_is_refused(cases):
    """n_slots that does not end where the groups' fill says (one slot more, a group more), or
    larger than the context."""
    assert not problems(cases, ["n_slots_past_fill", "n_slots_group_past_fill", "n_slots_huge"])


def test_corrupt_open_groups_are_refused(cases):
    """Two sequences filling one group, an open group that is full, a sequence open twice or
    out of range."""
    assert not problems(cases, ["open_group_shared", "open_group_full", "open_seq_twice",
                                "open_seq_out_of_range"])


def test_corrupt_slot_sequences_are_refused(cases):
    """A slot holding a sequence twice, one this context lacks, too many; a slot with a position
    and no sequence, a sequence with no position, a position twice: refused, or (the last three)
    loaded into a cache that is consistent (llama_memory_seq_pos_min/max match what it holds)."""
    assert not problems(cases, ["slot_seq_twice", "slot_seq_out_of_range", "slot_seq_count_over",
                                "slot_no_sequence", "slot_sequence_no_position", "slot_position_twice"])


def test_truncated_state_leaves_the_cache_clean(cases):
    """A state cut inside the LogQuant section raises from Llama.load_state and leaves the cache
    empty or as it was (it used to keep the f16 tier and half the 2-bit bookkeeping, and the next
    save aborted); so does one cut inside llama.cpp's own cell list (it kept the cells read so
    far); the states as saved still load."""
    assert not problems(cases, ["truncated_staging", "truncated_cell_list", "valid_unified", "valid_streams"])
    assert cases["truncated_staging"].get("exception"), "Llama.load_state did not raise"


def test_failed_sequence_restore_keeps_the_other_sequences(cases):
    """llama_state_seq_set_data of one sequence that fails (LogQuant refuses a sequence's own
    state; or it is cut short) leaves every other sequence as it was: its positions
    (llama_memory_seq_pos_min/max), its f16 tokens and its 2-bit slots. It used to empty the
    whole cache."""
    names = ["seq_restore_unified", "seq_restore_unified_no_lq", "seq_restore_streams",
             "seq_restore_truncated"]
    assert not problems(cases, names)
    for n in names:
        assert cases[n]["outcome"] in ("refused", "accepted")
