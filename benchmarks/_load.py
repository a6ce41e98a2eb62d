"""A trained workdir's model for the benchmarks that decode with one (not a command).

The benchmarks run as `python benchmarks/<name>.py`, which puts this folder on
sys.path: they `import _load`. jaxnmt is imported only when a model is loaded, so
`--help` stays fast.
"""


def trained_model(workdir: str, weights: str = 'auto'):
  """`inference.load(workdir, weights=weights)`: the latest checkpoint of `workdir`. A
  jaxnmt from before --weights (an older checkout being measured) loads its default."""
  from jaxnmt.decoding import inference  # pylint: disable=g-import-not-at-top
  try:
    return inference.load(workdir, weights=weights)
  except TypeError:  # a jaxnmt from before --weights
    return inference.load(workdir)
