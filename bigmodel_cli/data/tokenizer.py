"""Tokenizers: SentencePiece training with settings that round-trip text exactly, and loading a model's
tokenizer, SentencePiece (`tokenizer.model`) or Hugging Face (`tokenizer.json`, bigmodel_cli/data/tokenizer_hf.py),
the way transformers' AutoTokenizer finds it in a model directory."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from bigmodel_cli import rundir, storage
from bigmodel_cli.data.tokenizer_hf import HFTokenizer, read_config, token_text
from bigmodel_cli.data.tokenizer_hf import chat_template as config_chat_template
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

    # What transformers adds around a prompt and the chat template it renders with: configure() sets them from
    # a model directory's tokenizer_config.json; bigmodel's own tokenizers add nothing and have no template.
    add_bos = False
    add_eos = False
    chat_template: str | None = None

    def configure(self, config: dict) -> None:
        """Apply tokenizer_config.json as transformers 5 does to a bare tokenizer.model: BOS and EOS added as
        add_bos_token and add_eos_token say (neither when absent), the special tokens it names, its template.
        BOS and EOS default to the model's own; PAD, as transformers has it, to none unless the config names one."""
        if config:  # an empty config is none at all: bigmodel's own tokenizer, its ids as the model has them
            config = {"pad_token": None, **config}
        for kind in ("bos", "eos", "pad"):
            if f"{kind}_token" in config:
                text = token_text(config[f"{kind}_token"])
                found = self.sp.piece_to_id(text) if text is not None else -1
                setattr(self, f"{kind}_id", found if found >= 0 and self.sp.id_to_piece(found) == text else -1)
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_id >= 0
        self.add_eos = bool(config.get("add_eos_token", False)) and self.eos_id >= 0
        self.chat_template = config_chat_template(config.get("chat_template"))

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
        bos = [self.bos_id] if self.add_bos else []
        eos = [self.eos_id] if self.add_eos else []
        return bos + self.encode([text])[0] + eos

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


AnyTokenizer = Tokenizer | HFTokenizer


def sequence_start(tokenizer: AnyTokenizer) -> int:
    """The token bigmodel puts first in a sequence (-1 for none): the BOS where the tokenizer adds one, as
    transformers does to a prompt and Llama-family pretraining to each document; else the EOS that ends every
    preprocessed document, which opens the next one."""
    if tokenizer.add_bos:
        return tokenizer.encode_prompt("")[0]  # the post-processor's first token, whatever the config names
    return tokenizer.eos_id


# ---- a model's tokenizer files ------------------------------------------------------------------------------

# The files beside the main one that change what a tokenizer does (read by tokenizer_hf.read_config).
COMPANION_FILES = (rundir.TOKENIZER_CONFIG_FILE, rundir.SPECIAL_TOKENS_MAP_FILE, rundir.CHAT_TEMPLATE_FILE)


@dataclass(frozen=True)
class TokenizerFiles:
    """A tokenizer on disk: its main file, and the Hugging Face files beside it that configure it."""

    main: Path  # a tokenizer.json, or a SentencePiece model
    companions: tuple[Path, ...] = ()  # those of COMPANION_FILES beside it (and a tokenizer.json's tokenizer.model)

    @property
    def is_json(self) -> bool:
        return self.main.name.endswith(".json")

    @property
    def main_name(self) -> str:
        """The main file's name in a run, data or export directory (transformers' name)."""
        return rundir.TOKENIZER_JSON_FILE if self.is_json else rundir.TOKENIZER_FILE

    @property
    def names(self) -> dict[Path, str]:
        """Each file -> its name in a run, data or export directory."""
        return {self.main: self.main_name, **{p: p.name for p in self.companions}}

    def open(self) -> AnyTokenizer:
        config = read_config(self.main.parent)
        if self.is_json:
            return HFTokenizer(self.main, config)
        tokenizer = Tokenizer(self.main)
        tokenizer.configure(config)
        return tokenizer

    def copy_to(self, directory: Path) -> dict[str, str]:
        """Copy every file into directory under its name there (either end may be a bucket); name -> sha256."""
        directory = storage.path(directory)
        for source, name in self.names.items():
            storage.copy_file(source, directory / name)
        return {name: sha256_file(directory / name) for name in self.names.values()}


def find_files(source: Path | str) -> TokenizerFiles | None:
    """The tokenizer of a model directory, as AutoTokenizer picks it: tokenizer.json, else tokenizer.model (None:
    neither). A file is that tokenizer, configured by the files beside it."""
    source = storage.path(source)
    if source.is_dir():
        main = next(
            (source / n for n in (rundir.TOKENIZER_JSON_FILE, rundir.TOKENIZER_FILE) if (source / n).is_file()), None
        )
    else:
        main = source if source.is_file() else None
    if main is None:
        return None
    names = COMPANION_FILES
    if main.name == rundir.TOKENIZER_JSON_FILE:
        # Kept beside the tokenizer.json that restates it (Hugging Face models, bigmodel's HF exports): data
        # made with either file fits the model (tokenizer_sha).
        names += (rundir.TOKENIZER_FILE,)
    return TokenizerFiles(main, tuple(main.parent / n for n in names if (main.parent / n).is_file()))


def tokenizer_sha(home: Path | str, like: str | None = None) -> str | None:
    """The sha256 of a model directory's tokenizer (None without one), for checking data against it.

    A directory may hold one tokenizer twice, as tokenizer.json and tokenizer.model (Hugging Face models and
    bigmodel's HF exports do): `like`, the sha256 the data was made with, is the tokenizer's if either has it."""
    files = find_files(home)
    if files is None:
        return None
    home = storage.path(home)
    for name in (rundir.TOKENIZER_JSON_FILE, rundir.TOKENIZER_FILE):
        if like is not None and (home / name).is_file() and sha256_file(home / name) == like:
            return like
    return sha256_file(files.main)


def open_tokenizer(source: Path | str, needed_for: str = "pass a model directory, tokenizer.json or .model file"):
    """The tokenizer of a model directory or a tokenizer file; a UserError ending in needed_for when none."""
    files = find_files(source)
    if files is None:
        what = f"{source} has no {rundir.TOKENIZER_JSON_FILE} or {rundir.TOKENIZER_FILE}"
        raise UserError(f"{what}: {needed_for}" if storage.path(source).is_dir() else f"tokenizer {source} not found")
    return files.open()
