"""`logquant-gguf bench`: a smoke run of every part on the tiny model (seconds each), checking
the outputs' structure and the figures that must hold whatever the machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from logquant_gguf import KV_TYPES, bench
from logquant_gguf.bench import capacity, chat, completion, env, levers, memory, perplexity, report

# The llama.cpp types every build has, in decreasing size; new types come on top.
BASE_TYPES = [t for t in ("f16", "q8_0", "q4_0", "q2_0") if t in KV_TYPES]
NEW_TYPES = [t for t in KV_TYPES if t not in BASE_TYPES]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


def run_part(model: Path, out: Path, part: str, *args: str, kv: list[str] = BASE_TYPES) -> dict:
    # one thread: a tiny model gains nothing from two, and a busy machine slows two a lot
    argv = [part, "--model", str(model), "--out", str(out), "--kv-types", ",".join(kv),
            "--threads", "1", *args]
    assert bench.main(argv) == 0
    d = out / "cpu" / model.stem.lower()
    assert (d / f"{part}.md").is_file()
    doc = json.loads((d / f"{part}.json").read_text())
    assert doc["part"] == part and doc["device"] == "cpu"
    assert doc["command"][:3] == ["logquant-gguf", "bench", part]
    assert doc["model"]["sha256"] == env.sha256_file(str(model))
    assert doc["machine"]["cores_logical"] >= 1 and doc["build"]["backends"]
    return doc


def pngs(doc: dict, model: Path, out: Path) -> list[Path]:
    return sorted((out / "cpu" / model.stem.lower()).glob(f"{doc['part']}*.png"))


def test_memory_bytes_follow_bits_and_agree_with_llama_cpp(tiny_model, out):
    doc = run_part(tiny_model, out, "memory", "--ctx-sizes", "256,512")
    rows = doc["results"]["rows"]
    assert len(rows) == 2 * len(BASE_TYPES)
    for r in rows:
        assert r["log_agrees"], r
        assert r["theory_ratio"] == pytest.approx(1.0)
        assert r["bytes_total"] == r["bytes_per_token"] * r["n_ctx"]
    summary = doc["results"]["summary"]
    per_token = [summary[t]["bytes_per_token"] for t in BASE_TYPES]
    assert per_token == sorted(per_token, reverse=True) and len(set(per_token)) == len(per_token)
    for t in BASE_TYPES:  # no fixed part: the fitted line goes through 0
        assert summary[t]["fixed_bytes"] == 0
        assert summary[t]["marginal_bits_per_value"] == pytest.approx(KV_TYPES[t].bits_per_value)
    if report.plots_available():
        assert len(pngs(doc, tiny_model, out)) == 2


def test_memory_counts_the_room_a_logquant_cache_keeps_for_one_ubatch(tiny_model, tmp_path):
    """A LogQuant cache holds f16 cells for one ubatch beside its tiers: a smaller ubatch, fewer
    bytes (the difference is those cells, the f16 tier's k and v); llama.cpp's types do not care."""
    def total(kv: str, *ubatch: str) -> tuple[int, int]:
        doc = run_part(tiny_model, tmp_path, "memory", "--ctx-sizes", "2048", *ubatch, kv=[kv])
        return doc["results"]["rows"][0]["bytes_total"], doc["settings"]["n_ubatch"]

    (big, n_big), (small, n_small) = total("logquant"), total("logquant", "--n-ubatch", "64")
    assert (n_big, n_small) == (512, 64)
    geom_cells = 2 * 2 * 2 * 64 * 2  # layers x (k, v) x kv heads x head_dim x f16 bytes, per token
    assert big - small >= (512 - 64) * geom_cells
    assert total("q8_0")[0] == total("q8_0", "--n-ubatch", "64")[0]


def test_quality_f16_against_itself_is_exactly_zero_and_q2_0_is_not(tiny_model, out):
    kv = ["f16"] + (["q2_0"] if "q2_0" in KV_TYPES else [])
    doc = run_part(tiny_model, out, "quality", "--prompt-tokens", "128", "--steps", "8", kv=kv)
    per = doc["results"]["per_type"]
    assert per["f16"]["kl_mean"] == 0.0 and per["f16"]["kl_max"] == 0.0
    assert per["f16"]["top1_agreement"] == 1.0
    assert per["f16"]["ppl"] == pytest.approx(doc["results"]["baseline_ppl"])
    if "q2_0" in per:
        assert per["q2_0"]["kl_mean"] > 0
        assert len(per["q2_0"]["per_step"]["kl"]) == 8
    assert doc["texts"] and all(len(t["sha256"]) == 64 for t in doc["texts"])


def test_speed_medians_and_same_run_ratios(tiny_model, out):
    kv = ["f16", "q8_0", *NEW_TYPES]  # new types too: a cache that cannot roll back is timed
    doc = run_part(tiny_model, out, "speed", "--depths", "0,64", "--pp", "8", "--tg", "2",
                   "--reps", "3", kv=kv)
    summary = doc["results"]["summary"]
    assert set(summary) == {"0", "64"}
    for per in summary.values():
        assert per["f16"]["pp_vs_base"] == 1.0 and per["f16"]["tg_vs_base"] == 1.0
        assert all(s["pp_tps"] > 0 and s["tg_tps"] > 0 and s["reps"] == 3 for s in per.values())
    timed = [r for r in doc["results"]["rows"] if r["rep"] is not None]
    assert len(timed) == 2 * 3 * len(kv)
    assert [r["kv_type"] for r in timed[:len(kv) + 1]] == kv + [kv[1]]  # interleaved, rotated
    f16 = [r["start"] for r in timed if r["kv_type"] == "f16"]
    assert f16[3:] == [64, 74, 84]  # depth 64, then each repetition appends pp + tg


def test_capacity_from_measured_bytes_fits_the_budget(tiny_model, out):
    doc = run_part(tiny_model, out, "capacity", "--budgets-mib", "1", "--seq-lens", "256",
                   "--verify-max", "65536")
    assert doc["results"]["source"].endswith("memory.json")
    per = doc["results"]["budgets"]["1"]
    longest = [per[t]["max_ctx"] for t in BASE_TYPES]
    assert longest == sorted(longest) and per["f16"]["max_ctx"] == 1024  # 1 MiB / 1 KiB
    for kv, r in per.items():
        assert r["verified"]["fits"]
        # parallel sequences: computed with each sequence's own cost, then allocated
        assert r["parallel"]["256"] <= r["max_ctx"] // 256
        checked = r["parallel_verified"]["256"]
        assert checked["fits"] and checked["bytes_total"] <= 2**20 and checked["n_seq"] >= 1
        if doc["results"]["fits"][kv]["per_seq"] == 0:
            assert r["parallel"]["256"] == r["max_ctx"] // 256


def test_passkey_rows_per_trial_and_kv_type(tiny_model, out):
    doc = run_part(tiny_model, out, "passkey", "--lengths", "512", "--depths", "0.2,0.8",
                   "--answer-tokens", "4", kv=["f16", "q8_0"])
    rows = doc["results"]["rows"]
    assert len(rows) == 4 and all(r["prompt_tokens"] == 512 for r in rows)
    assert {r["key"] for r in rows if r["kv_type"] == "f16"} == \
        {r["key"] for r in rows if r["kv_type"] == "q8_0"}
    assert all(0 <= s["accuracy"] <= 1 for s in doc["results"]["summary"].values())


def test_completion_baseline_matches_itself(tiny_model, out):
    doc = run_part(tiny_model, out, "completion", "--prompts", "2", "--prompt-tokens", "64",
                   "--gen-tokens", "6", kv=["f16", "q4_0"])
    s = doc["results"]["summary"]
    assert s["f16"]["token_match"] == 1.0 and s["f16"]["first_line_vs_base"] == 1.0
    assert 0 <= s["q4_0"]["token_match"] <= 1
    assert len(doc["results"]["per_prompt"]["q4_0"]) == 2


def test_chat_replies_against_the_baseline(tiny_model, out):
    doc = run_part(tiny_model, out, "chat", "--prompts", "2", "--gen-tokens", "40",
                   "--chat-format", "llama-2", kv=["f16", "q4_0"])
    rows = doc["results"]["per_reply"]
    assert [len(r) for r in rows.values()] == [2, 2]
    assert all(n > 5 for n in doc["settings"]["prompt_tokens"])  # the chat template's text is in
    s = doc["results"]["summary"]
    assert s["f16"]["token_match"] == 1.0 and 0 <= s["q4_0"]["token_match"] <= 1
    for r in rows["f16"]:
        if len(r["tokens"]) < 40:  # ended before the limit: by an end-of-generation token
            assert r["stopped"]
        assert r["before_loop"] == (len(r["tokens"]) if r["loop_onset"] is None else r["loop_onset"])
        assert r["loop_onset"] == (None if r["stopped"] else chat.loop_onset(r["tokens"]))


def test_chat_sampled_replies_draw_the_same_numbers(tiny_model, tmp_path):
    """With --temperature every kv_type draws the same random numbers for a request: run twice with
    one type, the replies are the same; the settings say how they were made."""
    doc = run_part(tiny_model, tmp_path, "chat", "--prompts", "2", "--gen-tokens", "24",
                   "--chat-format", "llama-2", "--temperature", "0.7", kv=["f16", "q8_0"])
    assert doc["settings"]["temperature"] == 0.7
    again = run_part(tiny_model, tmp_path / "again", "chat", "--prompts", "2", "--gen-tokens", "24",
                     "--chat-format", "llama-2", "--temperature", "0.7", kv=["f16"])
    assert [r["tokens"] for r in again["results"]["per_reply"]["f16"]] == \
        [r["tokens"] for r in doc["results"]["per_reply"]["f16"]]


def test_chat_refuses_a_model_without_a_chat_template(tiny_model, out, capsys):
    """The tiny model's GGUF has no template: llama-cpp-python's "llama-2" fallback would go
    unnoticed, as it did on Gemma 3 270M (a base model), whose every reply was one EOS token."""
    assert bench.main(["chat", "--model", str(tiny_model), "--out", str(out), "--kv-types", "f16",
                       "--threads", "1", "--prompts", "1", "--gen-tokens", "4"]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_sampling_follows_the_default_chain():
    """bench chat's sampler: top-k, top-p, min-p, then the temperature; a draw u picks along the
    cumulative probabilities in descending order."""
    import numpy as np

    from logquant_gguf.bench.session import sample

    logits = np.full(1000, -50.0)
    logits[[7, 3, 9]] = [5.0, 5.0 - np.log(2.0), 5.0 - np.log(4.0)]  # probabilities 4 : 2 : 1
    logits[11] = 5.0 - np.log(40.0)  # under min-p (0.05 of the largest)
    assert sample(logits, 1.0, 0.0) == 7
    assert sample(logits, 1.0, 0.5) == 7 and sample(logits, 1.0, 0.6) == 3
    assert sample(logits, 1.0, 0.99) == 9  # 11 is never drawn, nor the 996 others
    assert {sample(logits, 1.0, u) for u in np.linspace(0, 0.999, 200)} == {7, 3, 9}
    assert {sample(logits, 0.01, u) for u in np.linspace(0, 0.999, 50)} == {7}  # cold: the top only
    flat = np.zeros(100)  # every token alike: top-k keeps 40 of them
    assert len({sample(flat, 1.0, u) for u in np.linspace(0, 0.999, 400)}) == 38  # top-p: 95 % of 40


def test_chat_loop_onset():
    """A reply ending in a repeated unit: where the unit first starts; short repeats, or a unit not
    repeated for LOOP_MIN_TOKENS tokens after its first occurrence, are no loop."""
    head = list(range(100, 150))
    unit = [1, 2, 3, 4, 5, 6, 7]
    assert chat.loop_onset(head + unit * 8) == 50
    assert chat.loop_onset(head + unit * 8 + [1, 2]) == 50  # cut inside a unit
    assert chat.loop_onset(head + unit * 4) is None  # 21 tokens of repeats after the first unit
    assert chat.loop_onset(head + [9] * 40) == 50  # a period of 1
    assert chat.loop_onset(list(range(300))) is None
    assert chat.loop_onset(head + unit * 8 + [99]) is None  # the reply left the loop
    long_unit = list(range(200, 260))  # a period of 60: two units are enough repeats
    assert chat.loop_onset(head + long_unit * 2) == 50
    assert chat.distinct_4grams([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(4 / 5)


def test_completion_takes_more_prompts_than_modules(tiny_model):
    """More prompts than code documents: the first round is one cut per document (the prompts of
    earlier runs, in order), later rounds cut each further in; no prompt twice."""
    from logquant_gguf.bench.core import BenchConfig

    cfg = BenchConfig(model=env.resolve_model(str(tiny_model)), kv_types=["f16"], out_root=Path("unused"))
    n_docs = len(list(completion.corpus.documents("code")))
    first, _ = completion.make_prompts(cfg, n_docs, 64)
    more, texts = completion.make_prompts(cfg, n_docs + 5, 64)
    assert len(more) == n_docs + 5 and len(texts) == n_docs
    assert [p["tokens"] for p in more[:n_docs]] == [p["tokens"] for p in first]
    assert len({tuple(p["tokens"]) for p in more}) == len(more)
    assert {p["file"] for p in more[n_docs:]} <= {p["file"] for p in first}


def test_layers_ranks_every_logquant_layer_and_measures_the_recipes(tiny_model, out):
    """Each of the tiny model's two layers alone at 8-bit codes, ranked by gain; the recipes
    (the best layer, then both) measured whole: more layers at 8 bits cost more bits and, with
    both, every key and value of the low-bit tier is 8-bit: closer to f16 than the base."""
    doc = run_part(tiny_model, out, "layers", "--codes", "8:8", "--counts", "1,2",
                   "--prompt-tokens", "128", "--steps", "8", kv=["logquant"])
    res = doc["results"]
    assert doc["settings"]["layers"] == [0, 1]
    assert sorted(res["ranked"]) == [0, 1]
    assert res["gains"][str(res["ranked"][0])] >= res["gains"][str(res["ranked"][1])]
    one, both = res["recipes"]["1"], res["recipes"]["2"]
    assert one["layers"] == [res["ranked"][0]] and one["layer_bits"] == f"{res['ranked'][0]}:8:8"
    assert both["layer_bits"] == "0:8:8,1:8:8"
    assert one["bits_per_value"] < both["bits_per_value"] == pytest.approx(8.5)
    base_kl = res["per_layer"]["per_type"]["logquant"]["kl_mean"]
    assert both["kl_mean"] < base_kl


def test_levers_count_the_tier_and_all_bytes(tiny_model, out):
    """KL per variant, with two prices: the low-bit tier's bits and every byte of the cache at a
    long context. llama.cpp's types are their bits either way; a LogQuant cache costs more than
    its tier (the cos/sin table, the f16 tier, the ubatch room), and 4-bit keys cost more than 2."""
    doc = run_part(tiny_model, out, "levers", "--variants", "q8_0,logquant,logquant+k4",
                   "--prompt-tokens", "128", "--steps", "8", "--bytes-ctx", "2048", kv=["f16"])
    per = doc["results"]["per_type"]
    assert doc["settings"]["bytes_ctx"] == 2048 and list(per) == ["f16", "q8_0", "logquant", "logquant+k4"]
    for t in ("f16", "q8_0"):
        assert per[t]["bits_all_bytes"] == pytest.approx(per[t]["bits_per_value"])
        assert per[t]["bits_per_value"] == KV_TYPES[t].bits_per_value
    for t in ("logquant", "logquant+k4"):
        assert per[t]["bits_all_bytes"] > per[t]["bits_per_value"] + 0.1
    assert per["logquant+k4"]["bits_all_bytes"] > per["logquant"]["bits_all_bytes"]
    assert per["f16"]["kl_mean"] == 0 < per["logquant"]["kl_mean"]
    md = (out / "cpu" / tiny_model.stem.lower() / "levers.md").read_text()
    assert "| all bytes at 2k |" in md
    if report.plots_available():
        assert [p.name for p in pngs(doc, tiny_model, out)] == ["levers.png", "levers_all_bytes.png"]


def test_levers_chart_labels_count_per_layer_settings():
    assert levers.short_label("logquant+k3+s8") == "logquant+k3+s8"
    assert levers.short_label("logquant+k3+s8+L16:3:4+L11:3:4+L9:3:4") == "logquant+k3+s8+3xL:3:4"
    assert levers.short_label("logquant+L0:8:8+L1:4:4+L2:8:8+Lauto") == "logquant+Lauto+1xL:4:4+2xL:8:8"


def test_device_runs_keep_logquant_kv_in_host_memory(tiny_model, monkeypatch):
    """--device cuda offloads every layer; without the LogQuant CUDA kernels (this build: the
    build info lists none) a LogQuant cache's attention is CPU code, so its KV cache stays in
    host memory there (llama.cpp would refuse an offloaded one); a -DLOGQUANT_CUDA=ON build keeps
    it in VRAM. On this CPU-only build the context opens the same way."""
    from logquant_gguf._capi import build_info
    from logquant_gguf.bench.session import Session, placement

    assert build_info()["logquant_gpu_kernels"] == []
    assert placement("cpu", "logquant") == {"n_gpu_layers": 0}
    assert placement("cuda", "q4_0") == {"n_gpu_layers": -1}
    for kv in ("logquant", "q2_window", "logquant+k4"):
        assert placement("cuda", kv) == {"n_gpu_layers": -1, "offload_kqv": False}
        assert placement("cuda", kv, gpu_kernels=["cuda"]) == {"n_gpu_layers": -1}
        assert placement("metal", kv, gpu_kernels=["cuda"]) == {"n_gpu_layers": -1, "offload_kqv": False}
        monkeypatch.delenv("LOGQUANT_METAL", raising=False)
        assert placement("metal", kv, gpu_kernels=["metal"]) == {"n_gpu_layers": -1, "offload_kqv": False}
        monkeypatch.setenv("LOGQUANT_METAL", "1")
        assert placement("metal", kv, gpu_kernels=["metal"]) == {"n_gpu_layers": -1}
        monkeypatch.delenv("LOGQUANT_METAL")
    s = Session(str(tiny_model), "logquant", 256, device="cuda")
    try:
        assert s.llm.context_params.offload_kqv is False
    finally:
        s.llm.close()


def test_a_tagged_run_goes_beside_the_untagged_one(tiny_model, out):
    """--tag T: a second run of a part (other settings) in <model>/T/, not over <model>/."""
    untagged = out / "cpu" / tiny_model.stem.lower() / "speed.json"
    before = untagged.read_bytes() if untagged.exists() else None
    argv = ["speed", "--model", str(tiny_model), "--out", str(out), "--kv-types", "f16,q4_0",
            "--threads", "1", "--depths", "0", "--pp", "4", "--tg", "1", "--reps", "1",
            "--tag", "two-types"]
    assert bench.main(argv) == 0
    doc = json.loads((untagged.parent / "two-types" / "speed.json").read_text())
    assert set(doc["results"]["summary"]["0"]) == {"f16", "q4_0"}
    assert (untagged.read_bytes() if untagged.exists() else None) == before
    with pytest.raises(SystemExit):
        bench.main([*argv[:-1], "../elsewhere"])


def test_summary_collects_every_part_written(tiny_model, out):
    assert bench.main(["summary", "--out", str(out)]) == 0
    text = (out / "cpu" / "README.md").read_text()
    slug = tiny_model.stem.lower()
    for part in ("memory", "quality", "speed", "capacity", "passkey", "completion"):
        assert f"## bench {part}: {tiny_model.name}" in text
    assert f"## {slug}, run `two-types`" in text  # the tagged run, after the model's own parts
    if report.plots_available():
        assert f"]({slug}/memory_total.png)" in text
        assert f"]({slug}/two-types/speed_tg.png)" in text


@pytest.mark.skipif(env.tool_path("llama-perplexity") is None,
                    reason="this build has no llama-perplexity")
def test_perplexity_tool_kld_of_f16_is_zero(tiny_model, out):
    doc = run_part(tiny_model, out, "perplexity", "--ctx", "128", "--chunks", "2",
                   kv=["f16", "q8_0"])
    runs = doc["results"]["runs"]
    assert runs["_base"]["returncode"] == 0, runs["_base"].get("output_tail")
    assert runs["f16"]["stats"]["Mean KLD"] == pytest.approx(0.0, abs=1e-6)
    assert runs["q8_0"]["stats"]["Mean KLD"] >= 0


def tool_output(cmd: list[str], extra_env: dict[str, str], want: str, tries: int = 8):
    """Runs a tool until its output has `want`: the pinned llama.cpp's asynchronous logger loses
    the last lines (all of them, for a quick failure) in some runs."""
    for _ in range(tries):
        p = env.run_tool(cmd, extra_env)
        if want in p.stdout + p.stderr:
            break
    return p


@pytest.mark.skipif(env.tool_path("llama-perplexity") is None,
                    reason="this build has no llama-perplexity")
def test_tools_report_an_unreadable_layer_bits_setting(tiny_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x\n" * 200)
    cmd = [str(env.tool_path("llama-perplexity")), "-m", str(tiny_model), "-f", str(text),
           "-c", "128", "-b", "128", "--chunks", "1", "-ctk", "lq2", "-ctv", "lq2", "-fa", "on"]
    bad = tool_output(cmd, {**env.tool_env("logquant"), "LOGQUANT_LAYER_BITS": "0:8"}, "cannot read")
    assert bad.returncode != 0
    assert "cannot read LOGQUANT_LAYER_BITS=\"0:8\"" in bad.stdout + bad.stderr
    good = env.run_tool(cmd, {**env.tool_env("logquant"), "LOGQUANT_LAYER_BITS": "0:8:8"})
    assert good.returncode == 0, good.stderr[-2000:]


@pytest.mark.skipif(env.tool_path("llama-perplexity") is None,
                    reason="this build has no llama-perplexity")
def test_perplexity_tool_runs_logquant_sequences_side_by_side(tiny_model, tmp_path):
    """llama-perplexity evaluates -b / -c chunks as parallel sequences: with a unified cache
    (-kvu) and with its default of one stream per sequence, the LogQuant cache gives every chunk
    the perplexity it gets alone."""
    text = tmp_path / "text.txt"
    text.write_text(Path("/usr/share/common-licenses/GPL-3").read_text()[:20000]
                    if Path("/usr/share/common-licenses/GPL-3").exists() else "def f(x): return x\n" * 2000)
    cmd = [str(env.tool_path("llama-perplexity")), "-m", str(tiny_model), "-f", str(text),
           "-c", "128", "--chunks", "8", "-ctk", "lq2", "-ctv", "lq2", "-fa", "on", "-t", "2"]
    # 2-bit tokens in every chunk; the fused kernel for every ubatch (with flash attention over
    # dequantized tiers, summation order follows the batch's size)
    lq = {**env.tool_env("logquant"), "LOGQUANT_WINDOW": "8", "LOGQUANT_PREFILL_FA_MIN": "0"}
    # the tool's last lines are lost in some runs (its asynchronous logger): retried as the bench does
    alone = perplexity._run(cmd + ["-b", "128"], "Final PPL", lq)
    for layout in (["-kvu"], []):
        side = perplexity._run(cmd + ["-b", "512"] + layout, "Final PPL", lq)
        assert alone["returncode"] == side["returncode"] == 0, side.get("output_tail")
        assert alone["stats"]["Final PPL"] == side["stats"]["Final PPL"], layout


# -- units -----------------------------------------------------------------------------------
def test_parse_stats_reads_llama_perplexity_summary():
    text = ("Mean PPL(Q)                   :   6.123456 ±   0.100000\n"
            "Mean    KLD:   0.012345 ±   0.000500\n99.0%   KLD:   0.200000\n"
            "Same top p: 97.500 ± 0.300 %\nFinal estimate: PPL = 6.1000 +/- 0.10000\n")
    s = perplexity.parse_stats(text)
    assert s["Mean PPL(Q)"] == 6.123456 and s["Mean PPL(Q) unc"] == 0.1
    assert s["Mean KLD"] == 0.012345 and s["99.0% KLD"] == 0.2 and s["Same top p"] == 97.5
    assert s["Final PPL"] == 6.1


def test_capacity_plan_and_fit():
    rows = [{"kv_type": "x", "n_ctx": n, "bytes_total": 1000 + 10 * n} for n in (256, 512, 1024)]
    fixed, per_token = memory.fit(rows, "x")
    assert fixed == 1000 and per_token == pytest.approx(10)
    p = capacity.plan(11000, fixed, per_token, 0, [100, 2000])
    assert p["max_ctx"] == 1000 and p["parallel"] == {"100": 10, "2000": 0}
    # each sequence's own cost (LogQuant's f16 tier per sequence) comes off the count
    p = capacity.plan(11000, fixed, per_token, 250, [100, 2000])
    assert p["parallel"] == {"100": 8, "2000": 0}
    assert capacity.plan(10**9, 0, 1, 0, [10])["parallel"]["10"] == capacity.MAX_SEQ


def test_completion_cut_after_def():
    text = "import os\n\n\ndef f(x):\n    return x\n\ndef g():\n\n    pass\n"
    assert completion.cut_after_def(text, 0) == ("import os\n\n\ndef f(x):\n", "    return x")
    assert completion.cut_after_def(text, 30)[1] == "    pass"
    assert completion.cut_after_def(text, 1000) is None
    assert completion.compare([1, 2, 3, 4], [1, 2, 9, 4]) == {"token_match": 0.75,
                                                               "common_prefix": 2}


def test_tool_env_tells_the_logquant_policies_apart():
    assert env.tool_env("f16") == {}
    log, win = env.tool_env("logquant"), env.tool_env("q2_window")
    assert log["LOGQUANT_POLICY"] == "log" and win["LOGQUANT_POLICY"] == "window"
    assert log["LOGQUANT_WINDOW"] == win["LOGQUANT_WINDOW"]


def test_cli_hook_parses_and_rejects_unknown_kv_type(tiny_model, tmp_path, capsys):
    ap = argparse.ArgumentParser(prog="logquant-gguf")
    bench.add_parser(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args(["bench", "memory", "--kv-types", "f16", "--quick", "--ctx-sizes", "256"])
    assert a.part == "memory" and a.quick and a.ctx_sizes == [256] and callable(a.func)
    assert bench.main(["memory", "--model", str(tiny_model), "--out", str(tmp_path),
                       "--kv-types", "f16,nope"]) == 2
    assert "nope" in capsys.readouterr().err
