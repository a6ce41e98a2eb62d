"""Learning-rate schedules and the optax optimizer."""

import jax.numpy as jnp
import optax


def learning_rate_schedule(peak: float, warmup_steps: int, kind: str,
                           total_steps: int) -> optax.Schedule:
  """Linear warmup to `peak`, then inverse square root ('rsqrt') or cosine to 0."""
  warmup_steps = max(warmup_steps, 1)
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  if kind == 'rsqrt':
    # (join_schedules also evaluates this branch before the boundary: clamp at 0.)
    decay = lambda step: peak * jnp.sqrt(warmup_steps / (jnp.maximum(step, 0) + warmup_steps))
  elif kind == 'cosine':
    decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup_steps, 1))
  else:
    raise ValueError(f'unknown learning-rate schedule {kind!r}')
  return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(optim_config, total_steps: int) -> tuple[optax.GradientTransformation,
                                                             optax.Schedule]:
  """AdamW with global-norm clipping; returns (transformation, schedule)."""
  schedule = learning_rate_schedule(optim_config.learning_rate, optim_config.warmup_steps,
                                    optim_config.schedule, total_steps)
  chain = []
  if optim_config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                           eps=optim_config.eps, weight_decay=optim_config.weight_decay))
  return optax.chain(*chain), schedule
