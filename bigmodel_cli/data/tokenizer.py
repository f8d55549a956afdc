"""SentencePiece tokenizers: training with settings that round-trip text exactly, and loading."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import sentencepiece as spm

from bigmodel_cli.errors import UserError

MODEL_TYPES = ("bpe", "unigram", "char")
# Newlines carry structure (verse, code, paragraphs); SentencePiece trains on lines and would drop them.
NEWLINE = "\n"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train(documents: list[str], out_file: Path, vocab_size: int, model_type: str) -> Path:
    """Train a tokenizer on the documents and write it to out_file (a .model file)."""
    if model_type not in MODEL_TYPES:
        raise UserError(f"--model-type must be one of {', '.join(MODEL_TYPES)}; got {model_type!r}")
    lines = [line for doc in documents for line in doc.split(NEWLINE) if line]
    if not lines:
        raise UserError("the corpus holds no text to train a tokenizer on: check the input files")
    special = 5  # <unk> <s> </s> <pad> and the newline symbol
    if model_type == "char":
        # A character vocabulary is exactly the corpus' characters: size it for the user.
        vocab_size = len(set("".join(lines)) - {" "}) + special + 1
    model = io.BytesIO()
    try:
        # Sentences from memory and the model into memory: no temporary paths end up inside the
        # model file, so the same corpus always gives byte-identical tokenizers.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=model_type != "char",
            character_coverage=1.0 if model_type == "char" else 0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            add_dummy_prefix=model_type != "char",
            byte_fallback=model_type == "bpe",
            user_defined_symbols=[NEWLINE],
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=False,  # keeps training (and so the output files) deterministic
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise UserError(
            f"tokenizer training failed: {str(err).splitlines()[-1]} (adjust --vocab-size)"
        ) from None
    out_file.write_bytes(model.getvalue())
    return out_file


class Tokenizer:
    """A loaded SentencePiece model with the ids our data and generation need."""

    def __init__(self, model_file: Path | str):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise UserError(f"tokenizer {model_file} not found: pass a SentencePiece .model file")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError):
            raise UserError(f"{model_file} is not a SentencePiece model: pass a .model file") from None
        self.path = model_file
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    def encode(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
