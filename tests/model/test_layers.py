"""model/layers: rotary position embeddings score by relative position and keep norms."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxnmt.model import layers


def test_rope_scores_depend_only_on_relative_position():
  query, key = jax.random.normal(jax.random.key(0), (2, 1, 1, 2, 16))
  def score(query_position, key_position):
    rotated_query = layers.apply_rope(query, jnp.array([[query_position]]))
    rotated_key = layers.apply_rope(key, jnp.array([[key_position]]))
    return jnp.einsum('BLNH,BLNH->N', rotated_query, rotated_key)
  np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(score(0, 0), score(57, 57), rtol=1e-4, atol=1e-5)
  assert not np.allclose(score(3, 1), score(3, 2), atol=1e-3)
  # Rotation keeps norms.
  np.testing.assert_allclose(jnp.linalg.norm(layers.apply_rope(query, jnp.array([[9]]))),
                             jnp.linalg.norm(query), rtol=1e-5)
