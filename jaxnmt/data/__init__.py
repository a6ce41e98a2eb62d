"""Data: corpus readers (`corpus`), the one-time preparation of sharded token ids
(`prepare`), the Grain training stream in a global order (`pipeline`) and the
language-model text pipeline (`lm`)."""
