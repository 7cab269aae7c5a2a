"""Working-memory budgets of the streaming torch paths: how many elements the largest temporary of one step may
hold. One definition each; the modules bind them to their own names at import (tests shrink those with
``monkeypatch`` to force many small blocks)."""

# Score entries [B, H, rows, S1, S2] of one block of the reference and the torch exact backend, and of the paper's
# row-streamed objects (4M float32 = 16 MiB).
SCORE_BLOCK_ELEMS = 1 << 22
# Feature entries [B, chunk, H, k] built at once by the non-causal polynomial paths (the single-process chunked
# op and context parallelism's readout and shard totals).
FEATURE_BLOCK_ELEMS = 1 << 24
# Running-sum entries [B, chunk, Hkv, k, Dv] of one chunk of the causal polynomial scan.
SCAN_STATE_ELEMS = 1 << 26
# Feature entries (rows x k) of one block of the paper's fast algorithm (float64: 8 MiB).
FAST_FEATURE_ELEMS = 1 << 20
