"""The logquant-gguf command."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile

from serving import package_env

import logquant_gguf._runtime as rt


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # cwd: away from the checkout; the package run is the one these tests imported
    return subprocess.run([sys.executable, "-m", "logquant_gguf", *args], cwd=tempfile.gettempdir(),
                          env=package_env(), capture_output=True, text=True, timeout=timeout)


def test_info_names_our_library_not_llama_cpp_pythons():
    r = run_cli("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["library"] == str(rt.library_path())
    assert "site-packages/llama_cpp/" not in info["library"]
    assert "CPU" in info["build"]["backends"]
    assert set(info["kv_types"]) >= {"f16", "q8_0", "q4_0", "q2_0"}


def test_our_kernels_use_the_instruction_set_ggml_uses():
    """When ggml's CPU backend was built with AVX2/FMA/F16C, so must our kernels be (they were
    not once: libllama's unity build had merged them into a source without the flags)."""
    from logquant_gguf import _capi

    info = _capi.build_info()
    ggml_avx2 = all(f"{f} = 1" in info["system_info"] for f in ("AVX2", "FMA", "F16C"))
    assert info["logquant_cpu_kernels"] == ("avx2" if ggml_avx2 else "scalar"), info["system_info"]


def test_info_shows_the_patch_series_and_model_metadata(tiny_model):
    r = run_cli("info", "--model", str(tiny_model))
    assert r.returncode == 0, r.stderr
    assert "0001-tools-accept-q2_0-as-a-KV-cache-type.patch" in r.stdout
    assert "general.architecture = llama" in r.stdout


def test_generate_streams_text(tiny_model):
    r = run_cli("generate", "hello", "--model", str(tiny_model), "--kv-type", "q4_0",
                "--max-tokens", "4", "--n-ctx", "256")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_unknown_kv_type_on_the_command_line(tiny_model):
    r = run_cli("generate", "hello", "--model", str(tiny_model), "--kv-type", "q3_nope")
    assert r.returncode == 2
    assert "invalid choice: 'q3_nope'" in r.stderr


def test_precision_levers_on_the_command_line(tiny_model):
    r = run_cli("generate", "hello", "--model", str(tiny_model), "--kv-type", "logquant",
                "--key-bits", "4", "--layer-bits", "0:8:8", "--max-tokens", "4", "--n-ctx", "256",
                "--verbose")
    assert r.returncode == 0, r.stderr
    assert "bits K 4 V 2, layers il:K:V 0:8:8" in r.stderr  # the cache says what it was given
    r = run_cli("generate", "hello", "--model", str(tiny_model), "--kv-type", "logquant",
                "--layer-bits", "0:8")
    assert r.returncode == 2
    assert "expected layer:key_bits:value_bits" in r.stderr


def test_generate_refuses_an_empty_prompt_in_one_line(tiny_model):
    """Before loading: with a model without BOS (Qwen) "" has no token and llama-cpp-python fails
    an assert inside sampling (the tiny model has a BOS and would generate from it)."""
    r = run_cli("generate", "", "--model", str(tiny_model), "--n-ctx", "256", "--max-tokens", "2")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip() == "logquant-gguf: error: the prompt is empty: give the text to continue"


def test_serve_refuses_a_port_out_of_range_in_one_line(tiny_model):
    """argparse says so, before the model loads (it used to load, then die in a traceback)."""
    r = run_cli("serve", "--model", str(tiny_model), "--port", "70000", timeout=60)
    assert r.returncode == 2, r.stderr
    assert "argument --port: '70000' is not a port number" in r.stderr
    assert "Traceback" not in r.stderr


def test_serve_says_the_port_is_taken_before_loading_the_model(tmp_path):
    """The model does not exist: the answer is about the port, so it was checked first."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("serve", "--model", str(tmp_path / "missing.gguf"), "--port", str(port),
                    timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"logquant-gguf serve: error: cannot listen on 127.0.0.1 port "
                                f"{port}: Address already in use")


def test_commands_default_to_the_logquant_cache_and_python_to_f16(tiny_model):
    import inspect

    from logquant_gguf import Llama
    from logquant_gguf.cli import build_parser

    for argv in (["generate", "hi"], ["chat"], ["serve"]):
        assert build_parser().parse_args(argv).kv_type == "logquant", argv
    assert inspect.signature(Llama).parameters["kv_type"].default == "f16"  # a drop-in
    r = run_cli("generate", "hello", "--model", str(tiny_model), "--max-tokens", "2",
                "--n-ctx", "256", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "LogQuant cache: window 32" in r.stderr  # the cache llama.cpp made


def test_missing_model_file_on_the_command_line(tmp_path):
    r = run_cli("generate", "hello", "--model", str(tmp_path / "missing.gguf"))
    assert r.returncode == 2
    assert "model file not found" in r.stderr


def test_python_api_runtime_is_ours():
    from pathlib import Path

    import llama_cpp

    import logquant_gguf  # noqa: F401
    assert Path(llama_cpp.llama_cpp._base_path).resolve() == rt.LIB_DIR
