"""Real data for the examples, all of it installed from the package registry.

No download at run time and no generated text:

* `text_corpus`: English prose, byte-level. By default the American Standard
  Version of the Bible (1901, public domain), about 4.1 MB, which the
  ``pythonbible`` package ships with its code; or any UTF-8 text file.
* `verse_genres`: a sentence-level classification task derived from the same
  text: which of six traditional divisions a verse comes from (law, history,
  wisdom and poetry, prophets, gospels and acts, letters and revelation).
* `digits`: scikit-learn's 8x8 handwritten digits (1,797 scans, 10 classes).

Held-out splits are fixed and disjoint from training: every tenth chapter of
the Bible (text and verses alike), the last tenth of a text file, a stratified
fifth of the digits.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np

BYTE_VOCAB = 256
EVAL_EVERY_NTH_CHAPTER = 10

# Book numbers (pythonbible's canonical order, 1-66) of each division.
GENRES = (
    ("law", range(1, 6)),             # Genesis - Deuteronomy
    ("history", range(6, 18)),        # Joshua - Esther
    ("wisdom", range(18, 23)),        # Job - Song of Solomon
    ("prophets", range(23, 40)),      # Isaiah - Malachi
    ("gospels", range(40, 45)),       # Matthew - Acts
    ("letters", range(45, 67)),       # Romans - Revelation
)


@dataclasses.dataclass(frozen=True)
class Verse:
  book: int
  chapter_index: int   # running count over the whole Bible, from 0
  text: str


def bible_verses() -> List[Verse]:
  """Every verse of the 66 books, in order (``pip install pythonbible``)."""
  try:
    import pythonbible as pb
  except ImportError as e:
    raise SystemExit("the examples' default corpus is the `pythonbible`"
                     " package: pip install -e '.[examples]' (or pass"
                     " --text-file)") from e
  verses, chapter_index = [], 0
  for book in list(pb.Book)[:66]:
    for chapter in range(1, pb.get_number_of_chapters(book) + 1):
      for verse in range(1, pb.get_number_of_verses(book, chapter) + 1):
        text = pb.get_verse_text(pb.get_verse_id(book, chapter, verse))
        verses.append(Verse(book.value, chapter_index, text))
      chapter_index += 1
  return verses


def _held_out(verse: Verse) -> bool:
  return verse.chapter_index % EVAL_EVERY_NTH_CHAPTER == EVAL_EVERY_NTH_CHAPTER - 1


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes as int32 token ids in [0, 256)."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TextCorpus:
  train: np.ndarray   # int32 byte ids
  eval: np.ndarray
  description: str


def text_corpus(path: Optional[str] = None) -> TextCorpus:
  """Byte-level language-modelling text: a file, or the Bible by default."""
  if path:
    with open(path, encoding="utf-8", errors="replace") as f:
      data = encode(f.read())
    if len(data) < 10_000:
      raise SystemExit(f"--text-file {path}: {len(data)} bytes; give at least 10 kB")
    split = int(0.9 * len(data))
    return TextCorpus(data[:split], data[split:],
                      f"{path} ({len(data):,} bytes; last 10% held out)")
  verses = bible_verses()
  pick = lambda held: encode("\n".join(v.text for v in verses if _held_out(v) == held))
  train, held = pick(False), pick(True)
  return TextCorpus(train, held, f"the Bible, American Standard Version (pythonbible;"
                    f" {len(train):,} training bytes, {len(held):,} held out:"
                    f" every {EVAL_EVERY_NTH_CHAPTER}th chapter)")


def lm_batch(data: np.ndarray, batch: int, seq_len: int, seed: int, step: int
             ) -> Tuple[np.ndarray, np.ndarray]:
  """Batch ``step`` of random windows: (inputs, next-byte targets).

  A pure function of (seed, step), so a resumed run sees the same batches.
  """
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
  window = data[starts[:, None] + np.arange(seq_len + 1)]
  return window[:, :-1], window[:, 1:]


@dataclasses.dataclass(frozen=True)
class Classification:
  train_x: np.ndarray
  train_y: np.ndarray
  eval_x: np.ndarray
  eval_y: np.ndarray
  classes: Tuple[str, ...]
  description: str


def verse_genres() -> Tuple[List[str], np.ndarray, List[str], np.ndarray]:
  """(train texts, labels, held-out texts, labels): each verse's division."""
  genre_of = {book: i for i, (_, books) in enumerate(GENRES) for book in books}
  split = {False: ([], []), True: ([], [])}
  for v in bible_verses():
    texts, labels = split[_held_out(v)]
    texts.append(v.text)
    labels.append(genre_of[v.book])
  (tx, ty), (ex, ey) = split[False], split[True]
  return tx, np.asarray(ty, np.int32), ex, np.asarray(ey, np.int32)


def digits(seed: int = 0) -> Classification:
  """scikit-learn's digits as [N, 8, 8, 1] floats in [0, 1], a fixed 80/20 split."""
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:
    raise SystemExit("the ViT example's data is scikit-learn's digits:"
                     " pip install -e '.[examples]'") from e
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  held = np.zeros(len(y), bool)
  for c in np.unique(y):  # a fifth of every class
    idx = rng.permutation(np.flatnonzero(y == c))
    held[idx[: len(idx) // 5]] = True
  return Classification(x[~held], y[~held], x[held], y[held],
                        tuple(str(c) for c in range(10)),
                        f"scikit-learn digits ({(~held).sum()} train, {held.sum()} held out)")
