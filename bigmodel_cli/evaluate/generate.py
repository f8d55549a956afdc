"""Text generation: a jitted KV-cache decode loop (prefill, then one token per step) with greedy,
temperature, top-k and top-p sampling, EOS and stop strings, and batched prompts of different lengths; and
conversations in a model's chat format."""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigmodel_cli import hf, modelio, parallel
from bigmodel_cli.data.tokenizer import AnyTokenizer
from bigmodel_cli.errors import UserError
from bigmodel_cli.model import quantize as quantization
from bigmodel_cli.model.params import LoadedModel
from bigmodel_cli.tasks import taskinfo
from bigmodel_cli.tasks.chat import chat_format


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 100  # tokens to add after each prompt
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 = all
    seed: int = 0  # the same seed gives the same text

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        # Written as ranges a value must fall in: nan fails every comparison, so `x < 0` alone would let it through
        if not 0 <= self.temperature < math.inf:
            raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")


def pick(logits: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Next token for each row of logits [B, V]."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B,V] descending
    kth = ordered[:, jnp.clip(top_k - 1, 0, scaled.shape[-1] - 1)][:, None]
    scaled = jnp.where((top_k > 0) & (scaled < kth), -jnp.inf, scaled)
    # top-p: drop tokens whose higher-ranked neighbours already hold probability >= p
    probs = jax.nn.softmax(jnp.sort(scaled, axis=-1)[:, ::-1], axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < top_p, jnp.sort(scaled, axis=-1)[:, ::-1], jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where((top_p < 1) & (scaled < cutoff), -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature <= 0, greedy, sampled)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_len"))
def _decode(graphdef, params, prompts, lengths, key, temperature, top_k, top_p, stops, *, max_new_tokens, cache_len):
    """prompts [B,P] right-padded, lengths [B] -> new tokens [B, max_new_tokens] (stops[0] after a stop token)."""
    model = nnx.merge(graphdef, params)
    batch = prompts.shape[0]
    cache = model.init_cache(batch, cache_len)
    logits, cache = model.decode(prompts, cache, jnp.zeros((batch,), jnp.int32), last=lengths - 1)  # [B,1,V]
    first = pick(logits[:, 0], jax.random.fold_in(key, 0), temperature, top_k, top_p)

    if max_new_tokens == 1:  # the prefill's token is all there is (an empty scan would still trace its step)
        return first[:, None]

    def step(carry, i):
        token, cache, done = carry
        logits, cache = model.decode(token[:, None], cache, lengths + i)  # [B,1,V]
        nxt = pick(logits[:, 0], jax.random.fold_in(key, i + 1), temperature, top_k, top_p)
        done = done | jnp.isin(token, stops)
        nxt = jnp.where(done, stops[0], nxt)
        return (nxt, cache, done), nxt

    done = jnp.zeros((batch,), bool)
    # The prefill gave the first token; each step feeds one token and yields the next, so no forward pass is
    # spent on logits past the last token asked for.
    _, rest = jax.lax.scan(step, (first, cache, done), jnp.arange(max_new_tokens - 1))
    return jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, max_new_tokens]


def generate_ids(
    loaded: LoadedModel, prompts: list[list[int]], sampling: Sampling, stops: Sequence[int] = (), pad_to: int = 0
) -> list[list[int]]:
    """New token ids for each prompt, cut after the first of the stop tokens (stop_ids: EOS and the like).

    pad_to fixes the padded prompt length (and so the compiled shapes) across calls with varying prompts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    limit = loaded.model_cfg.max_seq_len
    longest = max(max(len(p) for p in prompts), pad_to)
    if longest + sampling.max_new_tokens > limit:
        raise UserError(
            f"prompt ({longest} tokens) + --max-new-tokens {sampling.max_new_tokens} exceeds the "
            f"model's {limit} positions: shorten the prompt or ask for fewer tokens"
        )
    padded = np.zeros((len(prompts), longest), np.int32)
    for row, ids in enumerate(prompts):
        padded[row, : len(ids)] = ids
    lengths = np.array([len(p) for p in prompts], np.int32)
    cache_len = longest + sampling.max_new_tokens
    with parallel.activate(loaded.mesh):
        tokens = _decode(
            loaded.graphdef,
            loaded.params,
            padded,
            lengths,
            jax.random.key(sampling.seed),
            sampling.temperature,
            sampling.top_k,
            sampling.top_p,
            np.asarray(list(stops) or [-1], np.int32),
            max_new_tokens=sampling.max_new_tokens,
            cache_len=cache_len,
        )
    out = []
    for row in np.asarray(tokens).tolist():
        end = next((k + 1 for k, token in enumerate(row) if token in stops), len(row))
        out.append(row[:end])
    return out


def stop_ids(loaded: LoadedModel, tokenizer: AnyTokenizer) -> tuple[int, ...]:
    """The tokens a generation of this model ends at: the tokenizer's EOS, and those its generation_config.json
    lists besides (Llama 3 Instruct's <|eot_id|>), where transformers' generate stops too."""
    return tuple(dict.fromkeys(i for i in (tokenizer.eos_id, *hf.generation_stop_ids(loaded.home)) if i >= 0))


def complete(
    loaded: LoadedModel,
    tokenizer: AnyTokenizer,
    prompts: list[str],
    sampling: Sampling,
    stop: tuple[str, ...] = (),
) -> list[str]:
    """Continuations (without the prompts) of a batch of text prompts, cut at EOS and at any stop string."""
    # As transformers encodes a prompt (BOS where the model's tokenizer adds one); an empty one starts at EOS,
    # the document boundary of training.
    ids = [tokenizer.encode_prompt(p) or [tokenizer.eos_id] for p in prompts]
    texts, stops = [], stop_ids(loaded, tokenizer)
    for new in generate_ids(loaded, ids, sampling, stops):
        text = tokenizer.decode([t for t in new if t not in stops])
        cuts = [text.index(s) for s in stop if s and s in text]
        texts.append(text[: min(cuts)] if cuts else text)
    return texts


def _check_utf8(option: str, text: str) -> None:
    """Refuse text holding the surrogate escapes Python makes of command-line bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]  # "\udcff" stands for the byte 0xff
        what = f"byte {ord(bad) - 0xDC00:#04x}" if "\udc80" <= bad <= "\udcff" else repr(bad)
        raise UserError(
            f"{option} is not valid UTF-8 text ({what} at character {err.start}): "
            "pass UTF-8 text (is the terminal set to another encoding?)"
        ) from None


def open_model(model: Path, quantize: str = "") -> tuple[LoadedModel, AnyTokenizer, taskinfo.TaskInfo | None]:
    """The model (quantized as --quantize asks), its tokenizer (holding the chat template the model was
    finetuned with) and its task info."""
    quantization.check(quantize)
    loaded = quantization.apply(modelio.load(model), quantize)
    tokenizer = loaded.tokenizer("trained on synthetic tokens? there is nothing to decode with")
    info = taskinfo.read(loaded.home)
    tokenizer.chat_template = taskinfo.chat_template(info, tokenizer)
    return loaded, tokenizer, info


class Chat:
    """A conversation with a model in its chat format: each reply is generated from the whole history,
    rendered and encoded afresh (the oldest exchanges left out when it outgrows the model)."""

    def __init__(self, loaded: LoadedModel, tokenizer: AnyTokenizer, sampling: Sampling, stop: tuple[str, ...] = ()):
        self.loaded, self.tokenizer, self.sampling, self.stop = loaded, tokenizer, sampling, stop
        self.format = chat_format(tokenizer)
        self.messages: list[dict] = []
        self.stop_ids, _ = self.format.reply_stops(tokenizer, stop_ids(loaded, tokenizer))  # texts: cut below

    def _prompt(self) -> list[int]:
        """The conversation's prompt ids, its oldest exchanges (not a system message) left out until the reply
        has room; too long still when the last message alone does not fit (generate_ids then says so)."""
        room = self.loaded.model_cfg.max_seq_len - self.sampling.max_new_tokens
        keep = 1 if self.messages[0]["role"] == "system" else 0
        messages = self.messages
        while True:
            text = self.format.render(messages, add_generation_prompt=True)
            ids = self.format.encode(self.tokenizer, text)
            later = [i for i, m in enumerate(messages) if i > keep and m["role"] == "user"]
            if len(ids) <= room or not later:
                return ids
            messages = messages[:keep] + messages[later[0] :]

    def reply(self, text: str) -> str:
        """The model's reply to a user message, which joins the conversation with it."""
        self.messages.append({"role": "user", "content": text})
        ids = self._prompt()
        # Prompts padded to a power of two: a conversation compiles the decoder a few times, not every turn.
        room = self.loaded.model_cfg.max_seq_len - self.sampling.max_new_tokens
        pad_to = min(max(16, 1 << (len(ids) - 1).bit_length()), room)
        turn = len(self.messages) // 2
        sampling = dataclasses.replace(self.sampling, seed=self.sampling.seed + turn)
        new = generate_ids(self.loaded, [ids], sampling, tuple(self.stop_ids), pad_to=pad_to)[0]
        new = new[: next((k for k, t in enumerate(new) if t in self.stop_ids), len(new))]
        answer = self.tokenizer.decode(new)
        for stop in (self.format.end_of_turn, *self.stop):
            answer = answer.split(stop)[0] if stop else answer
        answer = answer.strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def run(
    model: Path,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: tuple[str, ...] = (),
    raw: bool = False,
    quantize: str = "",
) -> str:
    """Prompt + its continuation as text; for a model finetuned on chats (and not raw), its reply alone."""
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed)
    for option, text in (("--prompt", prompt), *(("--stop", s) for s in stop)):
        _check_utf8(option, text)
    loaded, tokenizer, info = open_model(model, quantize)
    if raw and (info is None or not info.chat_template):
        raise UserError(f"--raw applies to models finetuned on chats; {model} continues plain text already: drop it")
    if info is not None and info.chat_template and not raw:
        # The prompt becomes a user turn and the reply ends where the turn does, as in finetuning.
        return Chat(loaded, tokenizer, sampling, stop).reply(prompt)
    return prompt + complete(loaded, tokenizer, [prompt], sampling, stop)[0]


END_CHAT = "/exit"  # typed as a message, ends a conversation (as do an empty line and the end of the input)


def chat(
    model: Path,
    messages: Iterable[str],
    on_reply: Callable[[str], None],
    sampling: Sampling,
    stop: tuple[str, ...] = (),
    quantize: str = "",
) -> int:
    """Hold a conversation in the model's chat format: reply to each user message in turn, until an empty one
    or END_CHAT. Returns the number of replies."""
    for text in stop:
        _check_utf8("--stop", text)
    conversation = Chat(*open_model(model, quantize)[:2], sampling, stop)
    replies = 0
    for message in messages:
        if not message.strip() or message.strip() == END_CHAT:
            break
        _check_utf8("a message", message)
        on_reply(conversation.reply(message))
        replies += 1
    return replies


def terminal_lines() -> Iterator[str]:
    """Lines of standard input, with a prompt on stderr when a person types them."""
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError:
            raise UserError("standard input is not UTF-8 text: type or pipe UTF-8 messages") from None
        if not line:
            return
        yield line.rstrip("\n")
