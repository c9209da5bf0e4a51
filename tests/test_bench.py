"""The benchmarks' own CPU-side pieces (what runs on a GPU host is measured there, bench/README.md)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


def test_the_unsloth_peer_packs_every_token_into_full_rows():
    """bench/unsloth_peer.py's ``packed`` mode (issue 19's comparison): documents end to end, each with its EOS,
    cut into rows of exactly the length asked; only the last partial row is dropped."""
    from unsloth_peer import packed_rows

    class Tok:  # one id per character, BOS 1, EOS 2
        eos_token_id = 2

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [1] * add_special_tokens + [ord(c) for c in text]}

    docs = ["abc", "de", "fghij"]
    rows = packed_rows(docs, Tok(), 4)
    stream = [1, 97, 98, 99, 2, 1, 100, 101, 2, 1, 102, 103, 104, 105, 106, 2]
    assert rows == [stream[0:4], stream[4:8], stream[8:12], stream[12:16]]
    assert packed_rows(docs, Tok(), 5) == [stream[0:5], stream[5:10], stream[10:15]]  # 1 token left over
