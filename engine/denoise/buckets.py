"""The bucket tables: every length and size that a request's shapes are rounded up to.

Span guesses are how long a hole of unknown length is tried (each guess is one row of the
batch); the training rows' holes are drawn from the same table (engine/train/row_sampler.py), so
the model learns the layouts it is asked about. Shape buckets are what the static passes are laid
out and captured at (engine/denoise/kv_arena.py, graphs.py, static_batch.py).
"""

# A hole of unknown length is tried at each of these lengths: rows of one batch.
SPAN_GUESSES = (8, 16, 32, 64)
# The same in line mode: 24 tokens is ~80+ characters, a long line; passes grow with it.
LINE_SPAN_GUESSES = (8, 16, 24)
# The `expr` stop: the rest of an argument list or a condition is short.
EXPR_SPAN_GUESSES = (8, 16)

# Static pass shapes (kv_arena.Layout): rows in flight, context tokens, and query slots of the
# hole block (a guessed or a given span, up to the longest max_tokens).
BATCH_BUCKETS = (1, 2, 4, 8, 16)
CONTEXT_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
QUERY_BUCKETS = (8, 16, 32, 64, 128, 256, 512)
# Changed-token entries of a join pass (a request whose context came from the cache): a
# keystroke changes a token or two plus the recomputed window on each side (context_cache:
# 2 x 8), a pasted line a few dozen more (max_changed).
REFRESH_BUCKETS = (32, 128)
