"""Word-level language modelling: Penn Treebank (Mikolov's split) and batching.

Batching follows Zaremba et al. (and TensorFlow's ``ptb/reader.py``): the token stream
is cut into ``batch_size`` contiguous rows and read left to right in windows of
``seq_len``; the target of each window is the window shifted by one token. Loaders
iterate in order, so an LSTM may carry its hidden state from one batch to the next.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from approxtrain.data.info import PTB_VOCAB_SIZE, DatasetInfo, not_found

PTB_FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}
PTB_SUBFOLDERS = ("", "ptb", "PTB")
END_OF_SENTENCE = "<eos>"


class TokenBatches:
    """Re-iterable, in-order batches of a token stream.

    tokens: ``(N,)`` int64, cut into ``batch_size`` rows of ``L = N // batch_size`` tokens
    (the remainder is dropped). Yields ``(input, target)``, both ``(batch_size, seq_len)``
    int64, ``target[:, t] = input[:, t + 1]`` within the stream; ``(L - 1) // seq_len``
    batches per epoch (a last partial window is dropped, as in the reference reader).
    """

    def __init__(self, tokens: Tensor, batch_size: int, seq_len: int, *, name: str = "token") -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got batch_size={batch_size}, seq_len={seq_len}")
        row_length = tokens.numel() // batch_size
        if (row_length - 1) // seq_len < 1:
            raise ValueError(
                f"the {name} stream of {tokens.numel()} tokens is too short for one batch of "
                f"batch_size={batch_size} x seq_len={seq_len}; lower them"
            )
        self.data = tokens[: batch_size * row_length].reshape(batch_size, row_length).to(torch.int64)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.start_batch = 0

    def shard(self, rank: int, world_size: int) -> TokenBatches:
        """This rank's rows: the ``batch_size / world_size`` rows from ``rank`` times that on (the ranks'
        batches together are the one-process batch)."""
        if self.batch_size % world_size:
            raise ValueError(f"{self.batch_size} rows cannot be split evenly over {world_size} ranks")
        rows = self.batch_size // world_size
        self.data, self.batch_size = self.data[rank * rows : (rank + 1) * rows], rows
        return self

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate from batch ``start_batch`` on (the stream's order is the same every epoch)."""
        self.start_batch = start_batch

    def __len__(self) -> int:
        return (self.data.shape[1] - 1) // self.seq_len

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in range(self.start_batch, len(self)):
            start = batch * self.seq_len
            yield (
                self.data[:, start : start + self.seq_len],
                self.data[:, start + 1 : start + 1 + self.seq_len],
            )

    @property
    def num_tokens(self) -> int:
        """Target tokens per epoch: ``len(self) * batch_size * seq_len``."""
        return len(self) * self.batch_size * self.seq_len

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_size={self.batch_size}, seq_len={self.seq_len}, batches={len(self)})"


def read_words(path: Path) -> list[str]:
    """The file's words, with ``<eos>`` appended to every line."""
    with open(path, encoding="utf-8") as file:
        return [word for line in file for word in (*line.split(), END_OF_SENTENCE)]


def build_vocabulary(corpora: Sequence[Sequence[str]]) -> dict[str, int]:
    """Word -> id over all corpora, ids by decreasing frequency, ties broken by the word."""
    counts = Counter(word for words in corpora for word in words)
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return {word: index for index, (word, _) in enumerate(ordered)}


def find_ptb_folder(root: str, needed: Sequence[str]) -> Path | None:
    """The first of ``root``, ``root/ptb``, ``root/PTB`` that holds all ``needed`` files."""
    for sub in PTB_SUBFOLDERS:
        folder = Path(root) / sub
        if all((folder / file).is_file() for file in needed):
            return folder
    return None


def ptb(
    root: str, seq_len: int, train_split: str, *, batch_size: int, eval_batch_size: int
) -> tuple[TokenBatches, TokenBatches, DatasetInfo, TokenBatches | None]:
    """Penn Treebank: train on ``ptb.{train_split}.txt``, evaluate on ``ptb.test.txt``, validate on
    ``ptb.valid.txt`` when it is not the training split (else there is no validation data: ``None``).

    The vocabulary covers every PTB file present in the folder, so every word has an id. (The fields are
    checked where the run spec is made: :func:`approxtrain.spec.dataset_spec`.)
    """
    needed = (PTB_FILES[train_split], PTB_FILES["test"])
    folder = find_ptb_folder(root, needed)
    if folder is None:
        fallback = find_ptb_folder(root, (PTB_FILES["valid"], PTB_FILES["test"]))
        suggestion = "use dataset.train_split=valid" if train_split == "train" and fallback else ""
        where = ", ".join(str(Path(root) / sub) for sub in PTB_SUBFOLDERS)
        raise not_found("ptb", root, what=f"needs {' and '.join(needed)} in one of {where}", suggestion=suggestion)
    corpora = {split: read_words(folder / file) for split, file in PTB_FILES.items() if (folder / file).is_file()}
    vocabulary = build_vocabulary(list(corpora.values()))

    def encode(words: list[str]) -> Tensor:
        return torch.tensor([vocabulary[word] for word in words], dtype=torch.int64)

    train = TokenBatches(encode(corpora[train_split]), batch_size, seq_len, name=f"ptb {train_split}")
    test = TokenBatches(encode(corpora["test"]), eval_batch_size, seq_len, name="ptb test")
    has_val = train_split != "valid" and "valid" in corpora
    val = TokenBatches(encode(corpora["valid"]), eval_batch_size, seq_len, name="ptb valid") if has_val else None
    info = DatasetInfo("ptb", "text", vocab_size=max(len(vocabulary), PTB_VOCAB_SIZE), metric="perplexity")
    return train, test, info, val
