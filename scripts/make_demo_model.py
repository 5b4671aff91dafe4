"""Write a random-weight GGML model:
    python scripts/make_demo_model.py OUT.bin [--family glm4] [--dtype q4_0] [--endless]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.chatglm.demo_model import DEFAULT_EOS_EVERY, FAMILY_IDS, WEIGHT_TYPES, write_demo_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", choices=sorted(FAMILY_IDS), default="chatglm3")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (padded past the tokenizer)")
    parser.add_argument("--dtype", choices=sorted(WEIGHT_TYPES), default="f16", help="the matrices' ggml type")
    parser.add_argument("--endless", action="store_true", help="never write end-of-text")
    args = parser.parse_args()
    path = write_demo_model(args.out, family=args.family, hidden_size=args.hidden, num_layers=args.layers,
                            num_heads=args.heads, num_kv_heads=args.kv_heads, ffn_size=args.ffn,
                            max_length=args.max_length, eos_every=0 if args.endless else DEFAULT_EOS_EVERY,
                            vocab_size=args.vocab, dtype=args.dtype)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
