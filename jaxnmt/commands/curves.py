"""`--mode=curves`: renders a workdir's training and evaluation curves to PNG, for
people without TensorBoard. Reads the `metrics.jsonl` files the trainer and the eval
worker write next to their TensorBoard events."""

import io

from jaxnmt.training import metrics as metrics_lib
from jaxnmt.runtime import files
from jaxnmt.errors import WorkdirError

# (file under the workdir, metric key, panel title)
PANELS = (
    (files.TRAIN_LOGS, 'loss', 'training loss (label-smoothed)'),
    (files.VALID_LOGS, 'loss', 'validation loss (trainer)'),
    (files.EVAL, 'bleu', 'test BLEU (eval worker)'),
    (files.EVAL, 'chrf', 'test chrF (eval worker)'),
    (files.EVAL, 'bits_per_char', 'validation bits/char (eval worker)'),
)


def render(workdir: str, output: str | None = None) -> str:
  """Writes a 2-row PNG: the panels against step (top) and wall-clock minutes since the
  first training record (bottom). Returns its path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  series = []
  for logs, key, title in PANELS:
    records = [r for r in metrics_lib.read_jsonl(files.join(workdir, logs,
                                                                  files.METRICS))
               if key in r]
    if records:
      series.append((title, records, key))
  if not series:
    raise WorkdirError(f'{workdir} holds no metrics.jsonl under train/, valid/ or eval/')
  train_records = metrics_lib.read_jsonl(files.join(workdir, files.TRAIN_LOGS,
                                                           files.METRICS))
  start = min((r['time'] for r in train_records), default=min(
      r['time'] for _, records, _ in series for r in records))
  figure, axes = plt.subplots(2, len(series), figsize=(4.2 * len(series), 6.4), squeeze=False)
  for column, (title, records, key) in enumerate(series):
    steps = [r['step'] for r in records]
    minutes = [(r['time'] - start) / 60 for r in records]
    values = [r[key] for r in records]
    for row, (x, label) in enumerate(((steps, 'step'), (minutes, 'wall clock (minutes)'))):
      axes[row][column].plot(x, values, marker='.' if len(values) < 50 else None)
      axes[row][column].set_xlabel(label)
      axes[row][column].set_title(title, fontsize=10)
      axes[row][column].grid(alpha=0.3)
  figure.suptitle(files.absolute(workdir), fontsize=9)
  figure.tight_layout()
  output = output or files.join(workdir, files.CURVES)
  image = io.BytesIO()  # matplotlib writes local files only; the output may be gs://
  figure.savefig(image, format='png', dpi=100)
  files.write_bytes(output, image.getvalue())
  plt.close(figure)
  return output


def main(workdir: str, flags) -> None:
  del flags  # curves reads only the workdir
  print(render(workdir))
