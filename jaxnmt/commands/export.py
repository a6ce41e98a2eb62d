"""--mode=export: the model of WORKDIR as a CTranslate2 model directory (--output), with
its tokenizer files and a README on loading it (interop/ctranslate2.py does the work).

  python -m jaxnmt.main --mode=export --workdir=runs/tiny --output=runs/tiny-ct2 \
      --quantization=int8 [--weights=ema|raw|<averaged name>] [--checkpoint_step=N]
"""

import jax

from jaxnmt.decoding import inference
from jaxnmt.errors import UserError
from jaxnmt.interop import ctranslate2 as ct2_export


def main(workdir: str, flags) -> None:
  if not flags.output:
    raise UserError('--mode=export needs --output=DIR (a new directory for the model)')
  if jax.process_count() > 1:
    raise UserError('--mode=export runs on one process: start it without the launcher')
  loaded = inference.load(workdir, step=flags.checkpoint_step, weights=flags.weights)
  written = ct2_export.export(loaded, flags.output, flags.quantization)
  print(f'wrote the {written["kind"]} model ({written["quantization"]}) to '
        f'{written["output"]}: {", ".join(written["files"])}; see its README.md')
