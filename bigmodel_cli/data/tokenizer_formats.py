"""SentencePiece model files read without sentencepiece, and restated as a Hugging Face tokenizer.json.

`read_sentencepiece` parses the protobuf of a `.model` file (the few fields that decide encoding);
`tokenizer_json` turns it into the tokenizer.json that the `tokenizers` library encodes with, when it can.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from bigmodel_cli.data.tokenizer import SPACE_PIECE

# ----------------------------------------------------------------------------------------------------------
# SentencePiece model files (sentencepiece_model.proto), read without the sentencepiece library
# ----------------------------------------------------------------------------------------------------------

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece piece types
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4  # SentencePiece model types


@dataclass
class SpModel:
    """The fields of a SentencePiece model file that decide how text is encoded."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type) in id order
    model_type: int = UNIGRAM  # the proto2 defaults, for fields a model file leaves out
    byte_fallback: bool = False
    whitespace_as_suffix: bool = False
    normalizer: str = ""
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _protobuf_fields(buf: bytes):
    """(field number, value) of each field of one protobuf message: the few wire types sentencepiece uses."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    while pos < len(buf):
        key = varint()
        wire = key & 7
        if wire == 0:
            value: Any = varint()
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + width], pos + width
        elif wire == 2:
            length = varint()
            value, pos = buf[pos : pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def read_sentencepiece(data: bytes) -> SpModel:
    """The parts of sentencepiece's ModelProto (sentencepiece_model.proto) that decide how text is encoded."""
    model = SpModel(pieces=[])
    for field, value in _protobuf_fields(data):
        if field == 1:  # SentencePiece {1: piece, 2: score (float), 3: type}
            piece, score, kind = "", 0.0, NORMAL
            for f, v in _protobuf_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    kind = v
            model.pieces.append((piece, score, kind))
        elif field == 2:  # TrainerSpec {3: model_type, 24: treat_whitespace_as_suffix, 35: byte_fallback}
            for f, v in _protobuf_fields(value):
                if f == 3:
                    model.model_type = v
                elif f == 24:
                    model.whitespace_as_suffix = bool(v)
                elif f == 35:
                    model.byte_fallback = bool(v)
        elif field == 3:  # NormalizerSpec {1: name, 2: precompiled_charsmap, 3, 4, 5: flags}
            for f, v in _protobuf_fields(value):
                if f == 1:
                    model.normalizer = v.decode("utf-8")
                elif f == 2:
                    model.charsmap = v
                elif f == 3:
                    model.add_dummy_prefix = bool(v)
                elif f == 4:
                    model.remove_extra_whitespaces = bool(v)
                elif f == 5:
                    model.escape_whitespaces = bool(v)
    return model


# ----------------------------------------------------------------------------------------------------------
# tokenizer.json: the SentencePiece model restated for the `tokenizers` library
# ----------------------------------------------------------------------------------------------------------


def template_processing(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> dict:
    """A TemplateProcessing post-processor that puts the (token, id) bos before a text and eos after it."""
    ends = {"bos": [bos] if bos else [], "eos": [eos] if eos else []}

    def template(type_id: int, sequence: str) -> list[dict]:
        special = [{"SpecialToken": {"id": token, "type_id": type_id}} for token, _ in ends["bos"]]
        tail = [{"SpecialToken": {"id": token, "type_id": type_id}} for token, _ in ends["eos"]]
        return [*special, {"Sequence": {"id": sequence, "type_id": type_id}}, *tail]

    return {
        "type": "TemplateProcessing",
        "single": template(0, "A"),
        "pair": template(0, "A") + template(1, "B"),
        "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in ends["bos"] + ends["eos"]},
    }


def tokenizer_json(
    model_data: bytes, bos: tuple[str, int] | None = None, eos: tuple[str, int] | None = None
) -> dict | None:
    """A tokenizer.json that encodes like the SentencePiece model, or None for models it cannot restate; its
    post-processor adds the (token, id) bos and eos around a prompt, as bigmodel does with the model.

    Restated: BPE, unigram and char models without text normalisation (bigmodel's own settings). SentencePiece
    BPE merges, at each step, the adjacent pair whose concatenation is the highest-scoring piece; a BPE merge
    list ranked by that score does the same. Unigram keeps SentencePiece's scores, with the pieces that
    SentencePiece never matches in text (control, byte, unused) scored out of reach. The dummy-prefix space
    is a normaliser (added once, in front of the whole text), not a pre-tokenizer, and there is no
    pre-tokenizer: SentencePiece does not split on whitespace when encoding either.
    """
    sp = read_sentencepiece(model_data)
    restatable = (
        sp.model_type in (UNIGRAM, BPE, CHAR)
        and sp.normalizer in ("identity", "")
        and not sp.charsmap
        and not sp.remove_extra_whitespaces
        and not sp.whitespace_as_suffix
    )
    unknown = [p for p, _, kind in sp.pieces if kind == UNKNOWN]
    # User-defined symbols are single pieces wherever they occur, before any merging: added tokens, which
    # split the text before normalisation. After a split, though, the dummy prefix would be prepended to each
    # part; with a dummy prefix only one-character symbols work, as plain BPE symbols that no merge involves.
    symbols = [p for p, _, kind in sp.pieces if kind == USER_DEFINED]
    if not restatable or len(unknown) != 1 or (sp.add_dummy_prefix and any(len(p) > 1 for p in symbols)):
        return None
    vocab = {piece: i for i, (piece, _, _) in enumerate(sp.pieces)}
    normal = {piece: score for piece, score, kind in sp.pieces if kind == NORMAL}
    merges = []
    if sp.model_type == BPE:
        for piece, score in normal.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in normal and right in normal:
                    merges.append((-score, vocab[piece], vocab[left], left, right))
        merges.sort()
    # SentencePiece's unigram lattice leaves out control, unknown and byte pieces; tokenizers' cannot, so
    # they get a score that no segmentation picks while another exists. (One exception: text spelling a
    # control piece, such as "<s>", next to a character outside the vocabulary; the unknown character's
    # penalty, derived from the lowest score, is then worse still.)
    unreachable = -1e9
    unigram_vocab = [[p, s if kind in (NORMAL, USER_DEFINED) else unreachable] for p, s, kind in sp.pieces]
    normalizers = []
    if sp.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": SPACE_PIECE})
    if sp.escape_whitespaces:
        normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE_PIECE})
    decoders = [
        {"type": "Replace", "pattern": {"String": SPACE_PIECE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if sp.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    added_kinds = (UNKNOWN, CONTROL) if sp.add_dummy_prefix else (UNKNOWN, CONTROL, USER_DEFINED)
    added = [
        {
            "id": i,
            "content": piece,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind != USER_DEFINED,
        }
        for i, (piece, _, kind) in enumerate(sp.pieces)
        if kind in added_kinds
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": template_processing(bos, eos),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "Unigram",
            "unk_id": vocab[unknown[0]],
            "vocab": unigram_vocab,
            "byte_fallback": sp.byte_fallback,
        }
        if sp.model_type == UNIGRAM
        else {
            "type": "BPE",
            "dropout": None,
            "unk_token": unknown[0],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,  # SentencePiece also merges runs of unknown characters into one <unk>
            "byte_fallback": sp.byte_fallback,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[left, right] for *_, left, right in merges],
        },
    }
