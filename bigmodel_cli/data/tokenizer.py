"""SentencePiece tokenizers: training with settings that round-trip text exactly, and loading."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from bigmodel_cli import storage
from bigmodel_cli.errors import UserError

MODEL_TYPES = ("bpe", "unigram", "char")
# Newlines carry structure (verse, code, paragraphs); SentencePiece trains on lines and would drop them.
NEWLINE = "\n"
# SentencePiece writes a space as this character ("▁", U+2581) before looking pieces up, and decodes the
# piece back to a space. Without a "▁" piece (a corpus with no ASCII spaces, such as Chinese news), a space
# would fall back to the UTF-8 bytes of "▁", which decode to "▁", not to a space: every tokenizer gets one.
SPACE_PIECE = "\u2581"
SPECIALS = 4  # <unk> <s> </s> <pad>, ids 0-3 of every tokenizer we train
SAMPLE_LINE_CHARS = 2048  # longer training lines are cut (SentencePiece skips lines over max_sentence_length)


def sha256_file(path: Path) -> str:
    """A file's sha256, local or an object in a bucket (streamed through the hash, not copied)."""
    digest = hashlib.sha256()
    with storage.path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def training_lines(text: str) -> list[str]:
    """The non-empty lines of a text, long ones cut, as SentencePiece trains on them."""
    lines = [line for line in text.split(NEWLINE) if line]
    if lines and max(map(len, lines)) > SAMPLE_LINE_CHARS:
        lines = [line[i : i + SAMPLE_LINE_CHARS] for line in lines for i in range(0, len(line), SAMPLE_LINE_CHARS)]
    return lines


def train(
    documents: Iterable[str],
    out_file: Path,
    vocab_size: int,
    model_type: str,
    *,
    byte_fallback: bool | None = None,
    character_coverage: float = 0.0,
    special_tokens: tuple[str, ...] = (),
) -> Path:
    """Train a tokenizer on the documents (or lines) and write it to out_file (a .model file).

    byte_fallback None means on, for every model type: characters outside the vocabulary become UTF-8 byte
    pieces, never <unk>, so decode(encode(text)) == text; character_coverage 0 means 0.9995, or 1.0 for char.
    special_tokens become single pieces wherever they appear in text (ids 5, 6, ... after the newline at 4)."""
    if model_type not in MODEL_TYPES:
        raise UserError(f"--model-type must be one of {', '.join(MODEL_TYPES)}; got {model_type!r}")
    lines = [
        line
        for doc in documents
        for line in (training_lines(doc) if NEWLINE in doc or len(doc) > SAMPLE_LINE_CHARS else [doc] if doc else [])
    ]
    if not lines:
        raise UserError("the corpus holds no text to train a tokenizer on: check the input files")
    char = model_type == "char"
    coverage = character_coverage or (1.0 if char else 0.9995)
    if not 0 < coverage <= 1:
        raise UserError(f"--character-coverage must be in (0, 1], got {character_coverage}")
    # Byte fallback for char tokenizers too, at the cost of 256 ids: a character tokenizer trained on Chinese
    # text must still read the ASCII of a prompt template ("Context:", digits) and the rare characters of
    # unseen text, and <unk> would lose them silently. --no-byte-fallback gives the corpus-only vocabulary.
    fallback = True if byte_fallback is None else byte_fallback
    bad = [t for t in special_tokens if not t or any(c.isspace() for c in t)]
    if bad or len(set(special_tokens)) != len(special_tokens):
        raise UserError(f"--special-tokens must be distinct, non-empty and without spaces; got {special_tokens}")
    symbols = [NEWLINE, *special_tokens]
    if char:
        # A character vocabulary is exactly the corpus' characters: size it for the user.
        chars = set().union(*map(set, lines)) - {" ", SPACE_PIECE}  # both are the "▁" piece, counted below
        vocab_size = len(chars) + SPECIALS + len(symbols) + 1 + (256 if fallback else 0)
    model = io.BytesIO()
    try:
        # Sentences from memory and the model into memory: no temporary paths end up inside the
        # model file, so the same corpus always gives byte-identical tokenizers.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=not char,
            character_coverage=coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            # No "▁" added before the text: a word at the start of a line then has the same pieces in
            # training (one line per sentence) as after a newline inside a document, and encoding a
            # document in pieces cut after newlines gives exactly the tokens of encoding it whole.
            add_dummy_prefix=False,
            byte_fallback=fallback,
            # A normal piece, not a user-defined symbol: "▁" must still merge into word pieces ("▁the").
            required_chars=SPACE_PIECE,
            user_defined_symbols=symbols,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            input_sentence_size=0,  # the caller samples (preprocess: --max-sentences)
            max_sentence_length=4 * SAMPLE_LINE_CHARS,  # bytes: no sampled line is ever skipped
            shuffle_input_sentence=False,
            num_threads=1,  # the result depends on the thread count: one keeps it the same on every machine
            minloglevel=2,
        )
    except RuntimeError as err:
        raise UserError(f"tokenizer training failed: {str(err).splitlines()[-1]} (adjust --vocab-size)") from None
    out_file.write_bytes(model.getvalue())
    return out_file


class Tokenizer:
    """A loaded SentencePiece model with the ids our data and generation need (-1 where the model has none)."""

    def __init__(self, model_file: Path | str):
        model_file = storage.path(model_file)
        if not model_file.is_file():
            raise UserError(f"tokenizer {model_file} not found: pass a SentencePiece .model file")
        try:
            if storage.is_url(model_file):  # SentencePiece opens local files only: a bucket's is read into memory
                self.sp = spm.SentencePieceProcessor(model_proto=model_file.read_bytes())
            else:
                self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError):
            raise UserError(f"{model_file} is not a SentencePiece model: pass a .model file") from None
        self.path = model_file
        self.vocab_size = self.sp.vocab_size()
        # Read from the model, never assumed: Llama's has no pad (-1), others put eos at 1 or have none.
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    # What transformers adds around a prompt and the chat template it renders with (from tokenizer_config.json
    # where the model ships one); bigmodel's own tokenizers add nothing and have no template of their own.
    add_bos = False
    add_eos = False
    chat_template: str | None = None

    @property
    def bos_token(self) -> str | None:
        return self.sp.id_to_piece(self.bos_id) if self.bos_id >= 0 else None

    @property
    def eos_token(self) -> str | None:
        return self.sp.id_to_piece(self.eos_id) if self.eos_id >= 0 else None

    def encode(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """The ids of each text alone: no BOS or EOS added."""
        return self.sp.encode(texts, num_threads=num_threads)

    def encode_prompt(self, text: str) -> list[int]:
        """The ids a model sees for text as a prompt: transformers' `tokenizer(text).input_ids`."""
        bos = [self.bos_id] if self.add_bos and self.bos_id >= 0 else []
        eos = [self.eos_id] if self.add_eos and self.eos_id >= 0 else []
        return bos + self.encode([text])[0] + eos

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
