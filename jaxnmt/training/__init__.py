"""Training: `train_state` (parameters, optimizer state and their shardings), `optim`,
`steps` (the jitted train and eval steps), `loop` (the train loop), `fit` (compiled
memory of a step, and fitting the batch to a device), `preflight` (every compiled
function for any devices, and the mesh planner), `executables` (a compiled train step
saved and loaded), `feeding` (host batches onto the
mesh), `stopping` (signals and agreed stops), `metrics` (TensorBoard and
metrics.jsonl) and `samples` (translations written during training).
"""
