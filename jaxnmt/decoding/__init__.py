"""Decoding: `search` (greedy, sampling and beam search over the model's cache),
`selection` (the chunked top-k that search uses), `translation` (text in, text out:
batching, long inputs, detokenisation), `inference` (a model restored from a workdir),
`averaging` (averaged checkpoint weights) and `bleu`.
"""
