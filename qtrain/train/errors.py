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
