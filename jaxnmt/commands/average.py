"""--mode=average: average the newest checkpoints of WORKDIR into averaged/<name>, for
--weights=<name> (decoding/averaging.py does the work)."""

from jaxnmt.decoding import averaging


def main(workdir: str, flags) -> None:
  info = averaging.average(workdir, flags.average_last, flags.average_name,
                           flags.average_weights)
  print(f'averaged the {info["weights"]} weights of checkpoints {info["steps"]}: use '
        f'--weights={info["name"]}')
