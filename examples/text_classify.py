"""Text classifier: token embedding -> 2-layer bidirectional LSTM over a PackedSequence -> linear head.

    python -m examples.text_classify [--backend torch|auto|cpp|numba|...] [--epochs N] [--device cpu]
                                     [--csv FILE | --dir DIR] [--tokens char|word]

The default data are person names labeled by language: the surnames Faker ships for nine locales (its name
lists come from national name statistics), a character-level task, as in the classic "which language is
this name" tutorial. Names listed under two languages are dropped. ``--csv FILE`` reads your own data, a
CSV with a header naming the columns ``text`` and ``label``; ``--dir DIR`` a directory per class holding
one ``.txt`` file per example (the IMDB layout: point it at ``aclImdb/train``). Variable-length batches
go to the LSTM as PackedSequences (``pack_padded_sequence``, unsorted). The same seed gives torch.nn and
fastrnn the same initial weights and batches, so ``--backend torch`` and any fastrnn backend print the
same losses; only the time per epoch differs.
"""
from __future__ import annotations

import argparse
import collections
import csv
import importlib
import os
import re
import sys

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

from .common import BackendError, EpochTimer, add_common_args, batches, progress, rnn_class

# Faker locale -> language: Latin-script locales whose surname lists are large enough to learn from
LANGUAGES = {"en_US": "English", "de_DE": "German", "fr_FR": "French", "es_ES": "Spanish", "it_IT": "Italian",
             "nl_NL": "Dutch", "fi_FI": "Finnish", "cs_CZ": "Czech", "ga_IE": "Irish"}


class DataError(Exception):
    """Data that cannot be had or read: the message says what and how to fix it."""


# ---- data ------------------------------------------------------------------------------------------
def load_names():
    """(texts, labels, class names): surnames labeled by language, from the Faker package."""
    try:
        importlib.import_module("faker.providers.person")
    except ImportError as e:
        raise DataError("the default data of the text classifier (person names by language) ship in the 'faker' "
                        "package, which is not installed: pip install faker (make examples installs it)") from e
    langs = collections.defaultdict(set)
    for locale, lang in LANGUAGES.items():
        provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        for name in provider.last_names:  # a tuple, or a dict of name -> frequency
            langs[name.strip()].add(lang)
    names = sorted(n for n, ls in langs.items() if len(ls) == 1 and n)
    classes = sorted(LANGUAGES.values())
    return names, [classes.index(next(iter(langs[n]))) for n in names], classes


def load_csv(path):
    """(texts, labels, class names) from a CSV file whose header names the columns ``text`` and ``label``."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read the CSV file {path}: {e}") from e
    if not rows or not {"text", "label"} <= set(rows[0]):
        raise DataError(f"{path}: expected a CSV with a header row naming the columns 'text' and 'label' and at "
                        f"least one row, got columns {sorted(rows[0]) if rows else []} and {len(rows)} rows")
    bad = [k + 2 for k, r in enumerate(rows) if r["text"] is None or r["label"] is None]
    if bad:
        raise DataError(f"{path}: rows {bad[:5]} have fewer fields than the header")
    classes = sorted({r["label"] for r in rows})
    return [r["text"] for r in rows], [classes.index(r["label"]) for r in rows], classes


def load_dir(root):
    """(texts, labels, class names) from ``root/<class>/*.txt``, one example a file (the IMDB layout)."""
    if not os.path.isdir(root):
        raise DataError(f"{root} is not a directory (expected one sub-directory per class of .txt files)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    texts, labels = [], []
    for k, c in enumerate(classes):
        for fn in sorted(os.listdir(os.path.join(root, c))):
            if fn.endswith(".txt"):
                path = os.path.join(root, c, fn)
                try:
                    with open(path, encoding="utf-8") as f:
                        texts.append(f.read())
                except (OSError, UnicodeDecodeError) as e:
                    raise DataError(f"cannot read {path}: {e}") from e
                labels.append(k)
    if len(classes) < 2 or not texts:
        raise DataError(f"{root}: expected at least two sub-directories (one per class) holding .txt files, "
                        f"found classes {classes} with {len(texts)} files")
    return texts, labels, classes


def tokenize(text, kind):
    return list(text.lower()) if kind == "char" else re.findall(r"\w+|[^\w\s]", text.lower())


class Vocab:
    """Token ids from the training texts: 0 pads, 1 is any token not seen in training."""

    def __init__(self, token_lists, max_size=20000):
        counts = collections.Counter(t for toks in token_lists for t in toks)
        self.itos = ["<pad>", "<unk>"] + [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                                          [:max_size - 2]]
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def __len__(self):
        return len(self.itos)

    def encode(self, toks, max_len):
        ids = [self.stoi.get(t, 1) for t in toks[:max_len]] or [1]
        return torch.tensor(ids, dtype=torch.long)


def prepare(texts, labels, tokens, seed, held_out=0.2, max_len=400):
    """Tokenize, split (a seeded shuffle: ``held_out`` of the examples are held out), build the vocabulary
    on the training part. Returns (vocab, train, test) with each part a list of (ids, label)."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, int(len(texts) * held_out))
    toks = [tokenize(texts[i], tokens) for i in order]
    vocab = Vocab(toks[n_test:])
    data = [(vocab.encode(t, max_len), labels[i]) for t, i in zip(toks, order)]
    return vocab, data[n_test:], data[:n_test]


def collate(items, device):
    seqs = [s for s, _ in items]
    lengths = torch.tensor([len(s) for s in seqs])
    return (pad_sequence(seqs, batch_first=True).to(device), lengths,
            torch.tensor([y for _, y in items], device=device))


# ---- model -----------------------------------------------------------------------------------------
class Classifier(nn.Module):
    def __init__(self, vocab_size, num_classes, rnn, embed=32, hidden=64, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.rnn = rnn(embed, hidden, num_layers=layers, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(self.emb(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.head(torch.cat([h[-2], h[-1]], 1))  # the last layer's final states, both directions


def build(vocab_size, num_classes, backend, seed, device="cpu", **kw):
    rnn = rnn_class("LSTM", backend, device)
    torch.manual_seed(seed)  # the same initial weights for torch.nn and every fastrnn backend
    return Classifier(vocab_size, num_classes, rnn, **kw).to(device)


def accuracy(model, data, device, batch_size=256):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x, lengths, y = collate(data[i:i + batch_size], device)
            correct += int((model(x, lengths).argmax(1) == y).sum())
    model.train()
    return correct / len(data)


def train(model, train_set, test_set, *, epochs, batch_size=64, lr=3e-3, seed=0, device="cpu", quiet=True,
          max_steps=None, log=None):
    """Adam on the cross-entropy, batches in a seeded order. Returns {"losses": per step, "epochs": [(mean
    loss, held-out accuracy, seconds)]}. ``max_steps`` stops early (the tests' short runs)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses, epochs_out, timer = [], [], EpochTimer()
    for epoch in range(epochs):
        with timer:
            total = 0.0
            bs = batches(len(train_set), batch_size, gen)
            for idx in progress(bs, f"epoch {epoch + 1}/{epochs}", quiet):
                x, lengths, y = collate([train_set[i] for i in idx.tolist()], device)
                loss = nn.functional.cross_entropy(model(x, lengths), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                total += loss.item() * len(idx)
                if max_steps is not None and len(losses) >= max_steps:
                    break
        acc = accuracy(model, test_set, device)
        epochs_out.append((total / len(train_set), acc, timer.times[-1]))
        if log:
            log(f"epoch {epoch + 1}/{epochs}: loss {epochs_out[-1][0]:.4f}, held-out accuracy {acc:.3f}, "
                f"{timer.times[-1]:.2f} s")
        if max_steps is not None and len(losses) >= max_steps:
            break
    return {"losses": losses, "epochs": epochs_out, "timer": timer}


def load(args):
    if args.csv:
        texts, labels, classes = load_csv(args.csv)
    elif args.dir:
        texts, labels, classes = load_dir(args.dir)
    else:
        texts, labels, classes = load_names()
    tokens = args.tokens or ("char" if not (args.csv or args.dir) else "word")
    return texts, labels, classes, tokens


def parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, epochs=5)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--csv", help="a CSV file with columns text,label (a header row names them)")
    src.add_argument("--dir", help="a directory with one sub-directory of .txt files per class")
    ap.add_argument("--tokens", choices=["char", "word"], help="default: char for the names, word for files")
    ap.add_argument("--batch-size", type=int, default=64)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        texts, labels, classes, tokens = load(args)
        rnn_class("LSTM", args.backend, args.device)  # an unavailable backend fails here, with its reason
    except (DataError, BackendError) as e:
        sys.exit(f"error: {e}")
    vocab, train_set, test_set = prepare(texts, labels, tokens, args.seed)
    counts = collections.Counter(y for _, y in test_set)
    majority = max(counts.values()) / len(test_set)
    print(f"{len(texts)} examples, {len(classes)} classes ({', '.join(classes)}), {len(vocab)} {tokens} tokens; "
          f"held out {len(test_set)}, majority class {classes[counts.most_common(1)[0][0]]} = {majority:.3f}")
    model = build(len(vocab), len(classes), args.backend, args.seed, args.device)
    print(f"backend {args.backend}: {type(model.rnn).__module__}.{type(model.rnn).__name__}")
    res = train(model, train_set, test_set, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                device=args.device, quiet=args.quiet, log=print)
    print(f"held-out accuracy {res['epochs'][-1][1]:.3f} (majority class {majority:.3f}); time per epoch: "
          f"{res['timer'].summary()}")
    return res


if __name__ == "__main__":
    main()
