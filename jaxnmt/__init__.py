"""jaxnmt: Transformer translation and language models in JAX, Flax NNX, Grain and Orbax."""

__version__ = '0.1.0'
