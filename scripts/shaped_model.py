#!/usr/bin/env python3
"""A random-weight GGUF with a real model's attention and layer shapes, for speed runs where the
real model cannot travel (a lent GPU machine reaches no package index and takes 64 MiB a call).

The weights are random f32 (tests/tiny_model.py's llama writer) and the vocabulary is bytes, so
the text it writes means nothing; what it costs per token at a depth is what the KV caches are
compared on. Results measured on it say so (`bench speed --model` records the file).

    python3 scripts/shaped_model.py qwen2.5-coder-0.5b /tmp/qwen-shaped.gguf
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_model import write_tiny_llama  # noqa: E402

# the shapes of the models the benches use (their GGUFs' metadata)
SHAPES = {
    "qwen2.5-coder-0.5b": dict(n_embd=896, n_head=14, n_head_kv=2, head_dim=64, n_layer=24, n_ff=4864),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--n-ctx", type=int, default=65536, help="trained context it claims")
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_llama(a.out, n_ctx=a.n_ctx, qk_scale=0.1, **SHAPES[a.model])
    print(f"{a.out}: random weights with {a.model}'s shapes ({a.out.stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
