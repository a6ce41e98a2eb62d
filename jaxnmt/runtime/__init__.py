"""The runtime: what every other wing stands on, and imports nothing of theirs.

`host` (allocator and XLA:CPU settings, chosen before JAX starts), `distributed`
(joining the job, the peer watch, agreement between processes), `coordinator`
(JAX's coordination service in a process of its own), `files` (every local
and `gs://` path, and the workdir's layout), `locks` (the trainer lock and the eval
worker's lease), `sharding` (the mesh and the logical-axis rules), `checkpointing`
(Orbax checkpoints of a train state), `topology` (TPU slices and GPU clusters by name,
and their compile-only devices), `hlo` (what a compiled program needs and sends).
"""
