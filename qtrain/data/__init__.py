"""Data: seqio tasks -> token files (prepare time) -> packed grain batches.

The training path (`loader`, `token_file`, `vocab`) never imports seqio or
TensorFlow; `tasks` and `prepare` do, and are imported as modules, not here:
  python -m qtrain.data.prepare --task=kjv --out=data/kjv
"""

from qtrain.data.corpus import VALIDATION_BOOKS
from qtrain.data.corpus import load_documents
from qtrain.data.held_out import plan as eval_plan
from qtrain.data.loader import check_fingerprint
from qtrain.data.loader import check_vocab
from qtrain.data.loader import make_eval_batches
from qtrain.data.loader import make_train_iterator
from qtrain.data.loader import open_split
from qtrain.data.loader import read_meta
from qtrain.data.packing import BATCH_KEYS
from qtrain.data.token_file import TokenFile
from qtrain.data.token_file import TokenFileError
from qtrain.data.token_file import write_token_file
from qtrain.data.vocab import EOS_ID
from qtrain.data.vocab import PAD_ID
from qtrain.data.vocab import UNK_ID
from qtrain.data.vocab import load_sentencepiece
from qtrain.data.vocab import seqio_vocabulary
from qtrain.data.vocab import train_vocab
from qtrain.data.vocab import vocab_fingerprint
