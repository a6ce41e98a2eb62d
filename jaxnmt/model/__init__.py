"""The model: `layers` (attention, feed-forward, norms, positions), `transformer` (the
encoder-decoder and the decoder-only LM, built from one block), `losses`, `cache`
(the decoder cache's contract with beam search) and `initialize` (abstract and sharded
parameters). It imports only the runtime: never data, decoding or training.
"""
