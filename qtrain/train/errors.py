"""The errors a user can cause and fix: the CLIs print their one-line message
and exit 2 instead of a traceback. Anything else is a bug and keeps its
traceback.
"""

import contextlib

from qtrain.config import ConfigError
from qtrain.data.token_file import TokenFileError
from qtrain.train.checkpoint import CheckpointError
from qtrain.train.metrics import MetricsFileError
from qtrain.train.reporter import NonFiniteError



class DataError(ValueError):
  """The prepared data does not fit the run (splits, sizes, a saved position)."""


# FileNotFoundError: a workdir, config.json or prepared data that is not there.
EXPECTED = (ConfigError, DataError, TokenFileError, CheckpointError, MetricsFileError, NonFiniteError,
            FileNotFoundError)


def one_line(e: BaseException) -> str:
  """An expected error's message as the one line a CLI prints: a KeyError's
  text unquoted, whitespace collapsed, and a traceback quoted inside it (a
  config file that raised) shortened to its first and last lines."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  if len(lines) > 2 and lines[1].startswith("Traceback"):
    lines = [lines[0], lines[-1]]
  return " ".join(" ".join(lines).split())


@contextlib.contextmanager
def data_errors(data_dir: str):
  """The loader's ValueErrors (a split missing, too few documents, a saved
  position of another pipeline) are the user's to fix: DataError, one line."""
  try:
    yield
  except (DataError, TokenFileError):  # Already name the file.
    raise
  except ValueError as e:
    raise DataError(f"data in {data_dir}: {e}") from None
