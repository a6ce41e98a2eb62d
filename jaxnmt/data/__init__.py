"""Data: corpus readers (`corpus`), the tokenizer, the one-time preparation of sharded
token ids (`prepare`, `records`), the Grain training stream in a global order
(`order`, `pipeline`), the language-model text pipeline (`lm`), held-out batches
(`eval_batches`) and `inputs`, which gives a run its training and validation data."""
