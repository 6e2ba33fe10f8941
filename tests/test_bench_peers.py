"""`bench peers`: another llama.cpp build's KV types beside ours. The peer here is a FAKE
llama-perplexity (a small script printing what the real one prints), so no second build is
needed: these tests check the part's commands, parsing, bits per value, table and skip."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from logquant_gguf import bench
from logquant_gguf._runtime import LIB_DIR
from logquant_gguf.bench import peers, report

# What the fake peer's types declare, and the KLD it reports for each (K type, V type).
FAKE_PEER = r'''#!PYTHON
import json, os, sys
args = sys.argv[1:]
if "--version" in args:
    print("version: 4242 (abc1234)", file=sys.stderr)
    print("built with cc (fake) 12.2 for x86_64-linux-gnu", file=sys.stderr)
    sys.exit(0)
log = os.environ["FAKE_PEER_LOG"]
def opt(name):
    return args[args.index(name) + 1]
bits = {"f16": 16.0, "q8_0": 8.5, "turbo2": 2.125, "turbo3": 3.125, "turbo4": 4.25}
kld = {"q8_0": 0.001, "turbo2": 3.0, "turbo3": 2.8, "turbo4": 0.5}
tk = tv = opt("-ctk")
assert opt("-ctv") == tv
if tk not in bits:
    print(f"unsupported cache type {tk}", file=sys.stderr)
    sys.exit(1)
if tk.startswith("turbo") and os.environ.get("TURBO_AUTO_ASYMMETRIC") != "0":
    print("auto-asymmetric: upgrading K to q8_0", file=sys.stderr)
    tk = "q8_0"
with open(log, "a") as f:
    f.write(json.dumps({"argv": args, "asym": os.environ.get("TURBO_AUTO_ASYMMETRIC"),
                        "extra": os.environ.get("FAKE_EXTRA")}) + "\n")
for mib in (12.0, 4.0):  # two caches, as a model with sliding-window layers has
    k, v = mib * bits[tk] / 16, mib * bits[tv] / 16
    print(f"llama_kv_cache: size = {k + v:7.2f} MiB (  2048 cells,  24 layers,  1/1 seqs), "
          f"K ({tk}): {k:7.2f} MiB, V ({tv}): {v:7.2f} MiB", file=sys.stderr)
base = opt("--kl-divergence-base")
if "--kl-divergence" not in args:
    text = open(opt("-f"), encoding="utf-8").read()
    open(os.path.join(os.path.dirname(log), "text_seen.txt"), "w", encoding="utf-8").write(text)
    open(base, "w").write("fake base")
    print("Final estimate: PPL = 10.0000 +/- 0.10000")
    sys.exit(0)
assert open(base).read() == "fake base"
m = (kld[tk] + kld[tv]) / 2
print(f"Mean PPL(Q)                   :  {10 * (1 + m):.6f} ±   0.100000")
print(f"Mean PPL(Q)/PPL(base)         :   {1 + m:.6f} ±   0.010000")
print(f"Mean    KLD:   {m:.6f} ±   0.000500")
print(f"99.0%   KLD:   {4 * m:.6f}")
print(f"Same top p: {100 - 10 * m:.3f} ± 0.300 %")
'''


@pytest.fixture
def fake_peer(tmp_path, monkeypatch) -> Path:
    exe = tmp_path / "peer" / "bin" / "llama-perplexity"
    exe.parent.mkdir(parents=True)
    exe.write_text(FAKE_PEER.replace("PYTHON", sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("FAKE_PEER_LOG", str(tmp_path / "peer" / "calls.jsonl"))
    monkeypatch.delenv(peers.PEER_EXE_ENV, raising=False)
    return exe


def calls(exe: Path) -> list[dict]:
    return [json.loads(x) for x in (exe.parent.parent / "calls.jsonl").read_text().splitlines()]


def run_peers(model: Path, out: Path, *args: str) -> dict:
    argv = ["peers", "--model", str(model), "--out", str(out), "--threads", "1",
            "--ctx", "64", "--chunks", "2", *args]
    assert bench.main(argv) == 0
    return json.loads((out / "cpu" / model.stem.lower() / "peers.json").read_text())


def test_without_a_peer_the_part_says_how_to_build_one_and_skips(tiny_model, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.delenv(peers.PEER_EXE_ENV, raising=False)
    assert bench.main(["peers", "--model", str(tiny_model), "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "--peer-exe" in err and "cmake" in err and "llama-perplexity" in err
    doc = json.loads((tmp_path / "cpu" / tiny_model.stem.lower() / "peers.json").read_text())
    assert doc["results"] == {"skipped": "no --peer-exe"}
    assert "peers" not in bench.ALL  # `bench all` never needs a second build


def test_peer_rows_default_and_symmetric_with_declared_bits(tiny_model, tmp_path, fake_peer):
    doc = run_peers(tiny_model, tmp_path, "--peer-exe", str(fake_peer), "--ours", "none",
                    "--peer-types", "turbo3,turbo4", "--peer-env", "FAKE_EXTRA=1")
    res = doc["results"]
    assert res["peer"]["build_number"] == 4242 and res["peer"]["commit"] == "abc1234"
    assert res["peer"]["built_with"].startswith("cc (fake)")
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["turbo3", "turbo3 TURBO_AUTO_ASYMMETRIC=0", "turbo4",
                          "turbo4 TURBO_AUTO_ASYMMETRIC=0"]
    # the default: K switched to q8_0 by the peer itself, read from its log; bits the mean of K, V
    d, s = rows["turbo3"], rows["turbo3 TURBO_AUTO_ASYMMETRIC=0"]
    assert (d["type_k"], d["type_v"]) == ("q8_0", "turbo3")
    assert (s["type_k"], s["type_v"]) == ("turbo3", "turbo3")
    assert d["bits_per_value"] == pytest.approx((8.5 + 3.125) / 2, abs=0.01)
    assert s["bits_per_value"] == pytest.approx(3.125, abs=0.01)
    assert s["bits_source"] == "log MiB vs f16"  # no libggml-base beside the fake
    assert s["kld_mean"] == pytest.approx(2.8) and d["kld_mean"] == pytest.approx((0.001 + 2.8) / 2)
    assert s["same_top_p"] == pytest.approx(72.0) and s["ppl_ratio"] == pytest.approx(3.8)
    assert all(r["ok"] and r["build"] == "peer b4242" for r in rows.values())
    # one f16 baseline, then each type scored against it with our perplexity part's flags
    c = calls(fake_peer)
    assert len(c) == 5 and "--kl-divergence" not in c[0]["argv"]
    for call in c:
        a = call["argv"]
        assert call["extra"] == "1"
        for flag, value in (("-c", "64"), ("-b", "64"), ("--chunks", "2"), ("-t", "1"),
                            ("-fa", "on"), ("-ngl", "0")):
            assert a[a.index(flag) + 1] == value
    assert [x["asym"] for x in c[1:]] == [None, "0", None, "0"]
    md = (tmp_path / "cpu" / tiny_model.stem.lower() / "peers.md").read_text()
    assert "| peer b4242 | turbo3 | q8_0 / turbo3 | 5.81 | 1.4 |" in md
    assert "commit abc1234" in md


def test_our_rows_come_from_perplexity_json_on_the_same_text(tiny_model, tmp_path, fake_peer):
    first = run_peers(tiny_model, tmp_path, "--peer-exe", str(fake_peer), "--ours", "none",
                      "--peer-types", "turbo2", "--peer-variant", "none")
    seen = (fake_peer.parent.parent / "text_seen.txt").read_text(encoding="utf-8")
    assert first["settings"]["text_sha256"] == peers.hashlib.sha256(seen.encode()).hexdigest()
    # a perplexity.json of ours on that text: its rows are taken, nothing of ours is rerun
    ours = {"_base": {"returncode": 0, "stats": {"Final PPL": 9.0}},
            "q8_0": {"returncode": 0, "command": [], "stats": {"Mean KLD": 0.003,
                                                               "Same top p": 98.0}},
            "logquant": {"returncode": 0, "command": [], "stats": {"Mean KLD": 0.31}}}
    d = tmp_path / "cpu" / tiny_model.stem.lower()
    (d / "perplexity.json").write_text(json.dumps({
        "device": "cpu", "settings": {"ctx": 64, "chunks": 2, "text": "code"},
        "texts": first["texts"], "results": {"runs": ours}}))
    doc = run_peers(tiny_model, tmp_path, "--peer-exe", str(fake_peer), "--kv-types",
                    "q8_0,logquant", "--peer-types", "turbo2", "--peer-variant", "none")
    rows = [(r["build"], r["name"], r["bits_per_value"], r["kld_mean"]) for r in doc["results"]["rows"]]
    assert rows[:2] == [("ours", "q8_0", 8.5, 0.003), ("ours", "logquant", 2.5, 0.31)]
    assert rows[2][1] == "turbo2" and rows[2][2] == pytest.approx((8.5 + 2.125) / 2, abs=0.01)
    assert doc["results"]["ours"]["logquant"]["source"] == "perplexity.json"
    assert (d / "peers.png").is_file() or not report.plots_available()


def test_perplexity_json_of_another_text_or_context_is_not_used():
    settings = {"ctx": 2048, "chunks": 4, "text": "code"}
    texts = [{"path": "argparse.py", "sha256": "aa"}]
    doc = {"device": "cpu", "settings": dict(settings), "texts": texts,
           "results": {"runs": {"q8_0": {"returncode": 0, "stats": {"Mean KLD": 0.003}},
                                "q4_0": {"returncode": 1, "stats": {}}}}}
    assert list(peers.ours_from_json(doc, settings, texts, ["q8_0", "q4_0"], "cpu")) == ["q8_0"]
    assert peers.ours_from_json(doc, settings, [{"sha256": "bb"}], ["q8_0"], "cpu") == {}
    assert peers.ours_from_json(doc, {**settings, "chunks": 2}, texts, ["q8_0"], "cpu") == {}
    assert peers.ours_from_json(doc, settings, texts, ["q8_0"], "cuda") == {}


def test_parsing_the_kv_cache_lines_and_declared_type_sizes():
    out = ("llama_kv_cache: size =   14.62 MiB (  2048 cells,  24 layers,  1/1 seqs), "
           "K (q8_0):   12.75 MiB, V (turbo3):    1.88 MiB\n"
           "llama_kv_cache_iswa: something else\n"
           "llama_kv_cache: size =    1.00 MiB (   512 cells,   4 layers,  1/1 seqs), "
           "K (q8_0):    0.50 MiB, V (turbo3):    0.50 MiB\n")
    assert peers.kv_cache_types(out) == {"type_k": "q8_0", "type_v": "turbo3", "k_mib": 13.25,
                                         "v_mib": 2.38}
    assert peers.kv_cache_types("no cache here") is None
    # bits as a ggml declares them, read in a child process: our own ggml here
    lib = LIB_DIR / "libggml-base.so"
    if not lib.is_file():
        pytest.skip("no libggml-base.so in this build's lib/")
    bits = peers.declared_bits(lib)
    assert bits["f16"] == 16.0 and bits["q8_0"] == 8.5 and bits["q4_0"] == 4.5


def test_env_assignments_and_version_parsing(tmp_path, fake_peer):
    assert peers.env_assignments("A=1,B_2=x=y") == {"A": "1", "B_2": "x=y"}
    assert peers.env_assignments("none") == {}
    with pytest.raises(Exception):
        peers.env_assignments("not an assignment")
    v = peers.peer_version(fake_peer)
    assert (v["build_number"], v["commit"]) == (4242, "abc1234")
    assert v["sha256"] and os.path.samefile(v["exe"], fake_peer)


def test_a_type_the_peer_refuses_is_a_failed_row_with_its_message(tiny_model, tmp_path, fake_peer):
    doc = run_peers(tiny_model, tmp_path, "--peer-exe", str(fake_peer), "--ours", "none",
                    "--peer-types", "turbo9,turbo4", "--peer-variant", "none")
    rows = {r["name"]: r for r in doc["results"]["rows"]}
    assert not rows["turbo9"]["ok"] and rows["turbo4"]["ok"]
    md = (tmp_path / "cpu" / tiny_model.stem.lower() / "peers.md").read_text()
    assert "| turbo9 |" in md and "FAILED" in md and "unsupported cache type turbo9" in md


def test_speed_runs_interleave_and_compare_each_build_with_its_own_f16(tmp_path, monkeypatch):
    """--speed-depths: both builds' llama-bench, one repetition per call, every (build, type) once
    per repetition in a rotated order; medians and same-repetition ratios to the build's own f16;
    a type the peer's CPU path refuses is reported, not averaged."""
    from logquant_gguf.bench import peer_speed

    runs = peer_speed.entries(["f16", "logquant"], ["turbo3"], {}, [{"TURBO_AUTO_ASYMMETRIC": "0"}])
    assert [(r["build"], r["label"]) for r in runs] == [
        ("ours", "f16"), ("ours", "logquant"), ("peer", "f16"), ("peer", "turbo3"),
        ("peer", "turbo3 TURBO_AUTO_ASYMMETRIC=0")]
    assert runs[1]["ctk"] == "lq2" and runs[1]["env"]["LOGQUANT_POLICY"] == "log"
    speed = {("ours", "f16"): 10.0, ("ours", "logquant"): 13.0, ("peer", "f16"): 8.0,
             ("peer", "turbo3"): 6.0}
    calls = []

    def fake_call(exe, model, ctk, ctv, depth, pp, tg, threads, extra_env):
        build = "ours" if exe == "OURS" else "peer"
        label = next(r["label"] for r in runs if r["build"] == build and r["ctk"] == ctk and r["env"] == extra_env)
        calls.append((build, label))
        if label.endswith("=0"):
            return {"returncode": 1, "error": "unsupported cache type"}
        v = speed[(build, label)] * (1 + 0.1 * len(calls) / 100)  # a slow drift
        return {"returncode": 0, "pp_tps": 3 * v, "tg_tps": v}

    monkeypatch.setattr(peer_speed, "_call", fake_call)
    rows = peer_speed.measure(Path("m.gguf"), "OURS", "PEER", runs, [4096], 32, 16, 3, 2)
    assert len(calls) == 15 and calls[0] == ("ours", "f16") and calls[5] == ("ours", "logquant")
    summary = {(s["build"], s["label"]): s for s in peer_speed.summarize(rows)}
    assert summary[("ours", "logquant")]["tg_vs_f16"] == pytest.approx(1.3, rel=0.01)
    assert summary[("peer", "turbo3")]["pp_vs_f16"] == pytest.approx(0.75, rel=0.01)
    assert summary[("peer", "f16")]["tg_vs_f16"] == pytest.approx(1.0)
    assert "unsupported" in summary[("peer", "turbo3 TURBO_AUTO_ASYMMETRIC=0")]["error"]
    md = peer_speed.markdown(list(summary.values()), 32, 16, 3, 2)
    assert "| 4096 | peer | turbo3 TURBO_AUTO_ASYMMETRIC=0 | failed: unsupported cache type" in md
