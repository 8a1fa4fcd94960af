"""Per-request sampling settings, validated on construction.

SamplingParams crosses the executor boundary (to workers, through the shm rings), so it is
plain data: `to_dict` / `from_dict` give a msgpack-able form.
"""

from __future__ import annotations

import collections.abc
import math
import numbers
from dataclasses import asdict, dataclass, field, fields

MIN_TEMPERATURE = 1e-5
# Seen tokens' positive logits are divided by the repetition penalty, their negative ones
# multiplied. At these bounds the sampler already picks among seen tokens only (or unseen
# ones only, if any); far beyond them the fp32 logits overflow to inf or -inf, and the
# softmax of two infs, or of nothing but -inf, gives NaN logprobs and draws token 0.
MIN_REPETITION_PENALTY = 1e-5
MAX_REPETITION_PENALTY = 1e5
# Samples of one prompt. Far above any real use; it stops a mistaken huge n, for which the
# engine would build sequences until the host ran out of memory.
MAX_N = 4096
# The integers the rings' msgpack serializer carries: every valid SamplingParams reaches
# the workers, whose executor would otherwise fail the step, and with it the engine.
MIN_INT = -2**63
MAX_INT = 2**63 - 1
MAX_SEED = 2**64 - 1
# Stop strings of one request. Every step checks each against the new text of each of the
# request's sequences (10,000 of them took 1.7 ms a sequence a step, for every sequence in
# the batch); OpenAI takes 4, evaluation harnesses send a few.
MAX_STOP_STRINGS = 64
# OpenAI's bound on a logit_bias value: -100 bans a token in effect, 100 all but forces it.
MAX_LOGIT_BIAS = 100.0


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request.

    temperature == 0 means greedy; otherwise it must be at least MIN_TEMPERATURE, below
    which dividing the logits overflows. top_k == -1, top_p == 1 and min_p == 0 disable
    top-k, nucleus and min-p filtering. repetition_penalty must lie in
    [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY], for the same reason. `seed` makes
    the sampled tokens reproducible regardless of which other requests share the batch.
    `max_tokens=None` generates until a stop condition or until the sequence (prompt
    included) holds max_model_len tokens, or as many as the KV cache can hold if that is
    fewer; it then ends with finish_reason "length". `skip_special_tokens` leaves special
    tokens (such as a chat model's <|im_start|>) out of the output text; their ids stay in
    token_ids.
    `min_tokens` holds off every stop condition but the length limits until the sequence
    has that many tokens: the sampler masks the eos token (unless ignore_eos) and the
    stop_token_ids, and stop strings do not end it; it may not exceed max_tokens. `stop`
    takes at most MAX_STOP_STRINGS strings (each is checked every step).
    `logprobs` asks for each token's log-probability and its n most likely alternatives;
    the engine refuses n above the model's vocabulary size (the only limit it knows here),
    and the HTTP server caps it at OpenAI's 20. `prompt_logprobs` asks, in the same way,
    for each prompt token's log-probability given the tokens before it (from the raw model
    logits) and the k most likely tokens at its position (RequestOutput.prompt_logprobs);
    a request that asks computes its whole prompt, taking none of it from the prefix cache.
    `logit_bias` maps token ids to a bias from -MAX_LOGIT_BIAS to MAX_LOGIT_BIAS (OpenAI's
    field) added to their logits; `allowed_token_ids` (a non-empty list) leaves only those
    tokens to sample, every other one at -inf. Both apply after the stop-token masks of
    min_tokens and the penalties, before temperature and the filters; a masked token stays
    masked whatever its bias. The reported logprobs follow them as they follow the
    penalties: a greedy row's are the log-softmax of the biased, restricted logits, a
    sampled row's of those after temperature and the filters. The engine refuses ids
    outside the model's vocabulary, and allowed_token_ids that min_tokens masks entirely.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    # One item, a list or None when given; always a list once built.
    stop_token_ids: int | list[int] | None = field(default_factory=list)
    stop: str | list[str] | None = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # None or a non-empty map once built (an empty one is None).
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Take numpy numbers as Python ones and `stop` / `stop_token_ids` as lists, as on
        construction; raise ValueError naming the first invalid field. Run again after the
        fields were changed (the engine does), it takes what the constructor takes."""
        for name in (*_INT_FIELDS, *_REAL_FIELDS):
            setattr(self, name, _python_number(getattr(self, name)))
        self.stop = _as_list(self.stop, "stop", str)
        self.stop_token_ids = [_python_number(t) for t in
                               _as_list(_python_number(self.stop_token_ids),
                                        "stop_token_ids", int)]
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", self.n,
               f"an integer from 1 to {MAX_N}")
        for name in _REAL_FIELDS:
            value = getattr(self, name)
            _check(_is_real(value), name, value, "a finite number")
        _check(self.temperature == 0.0 or self.temperature >= MIN_TEMPERATURE, "temperature",
               self.temperature, f"0 (greedy) or >= {MIN_TEMPERATURE}")
        _check(_is_int(self.top_k) and (self.top_k == -1 or 1 <= self.top_k <= MAX_INT),
               "top_k", self.top_k, "-1 (disabled) or an integer from 1 to 2**63 - 1")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "in (0, 1]")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "in [0, 1]")
        _check(MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
               "repetition_penalty", self.repetition_penalty,
               f"from {MIN_REPETITION_PENALTY:g} to {MAX_REPETITION_PENALTY:g}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty,
               "in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               self.frequency_penalty, "in [-2, 2]")
        _check(self.max_tokens is None or (_is_int(self.max_tokens)
                                           and 1 <= self.max_tokens <= MAX_INT),
               "max_tokens", self.max_tokens,
               "None (up to max_model_len) or an integer from 1 to 2**63 - 1")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= (
            MAX_INT if self.max_tokens is None else self.max_tokens), "min_tokens",
            self.min_tokens, "an integer from 0 to " + (
                "2**63 - 1" if self.max_tokens is None else f"max_tokens={self.max_tokens}"))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and 0 <= value <= MAX_INT), name, value,
                   "None or an integer from 0 to 2**63 - 1")
        # Sample i of n draws with seed + i.
        _check(self.seed is None or (_is_int(self.seed)
                                     and MIN_INT <= self.seed <= MAX_SEED - (self.n - 1)),
               "seed", self.seed, f"None or an integer from -2**63 to 2**64 - {self.n} "
               f"(sample i of n={self.n} draws with seed + i)")
        for name in ("ignore_eos", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name),
                   "True or False")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", _Count(len(self.stop)),
               f"a list of at most {MAX_STOP_STRINGS} strings")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "a list of non-empty strings")
        _check(all(_is_int(t) and 0 <= t <= MAX_INT for t in self.stop_token_ids),
               "stop_token_ids", self.stop_token_ids,
               "a list of token ids (integers from 0 to 2**63 - 1)")
        self.logit_bias = _bias_map(self.logit_bias)
        self.allowed_token_ids = _allowed_ids(self.allowed_token_ids)

    @property
    def greedy(self) -> bool:
        """Whether the next token is always the most likely one (temperature 0)."""
        return self.temperature == 0.0

    @property
    def needs_token_history(self) -> bool:
        """Whether sampling reads the tokens so far (penalties do), so each step needs every
        earlier output token on the host first."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def to_dict(self) -> dict:
        """The fields as plain data, for the rings' msgpack serializer."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        """The params `to_dict` gave (validated again); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


_REAL_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty")
_INT_FIELDS = ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "seed")


def _python_number(value: object) -> object:
    """A numpy (or other registered) integer or real scalar as the Python int or float it
    holds, so that values computed with numpy are taken; anything else as it is."""
    if type(value) in (bool, int, float):   # not a subclass such as numpy.float64
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


_KIND = {str: "a string", int: "an integer"}


def _as_list(value: object, name: str, item: type) -> list:
    """`stop` or `stop_token_ids` as a list: None is an empty one, a lone item a list of
    it; anything else must be a list, tuple or set (validate checks the items)."""
    if value is None:
        return []
    if isinstance(value, item) and not isinstance(value, bool):
        return [value]
    _check(isinstance(value, (list, tuple, set, frozenset)), name, value,
           f"None, {_KIND[item]} or a list of them")
    return list(value)


class _Count(int):
    """A list's length where a message would show the list: `stop=<70 strings>`."""

    def __repr__(self) -> str:
        return f"<{int(self)} strings>"


_TOKEN_ID = "a token id (an integer from 0 to 2**63 - 1)"


def _bias_map(value: object) -> dict[int, float] | None:
    """logit_bias as a dict of int ids to float biases (None when empty), or an
    InvalidSamplingParam naming the first bad entry by its key."""
    if value is None:
        return None
    _check(isinstance(value, collections.abc.Mapping), "logit_bias", value,
           "None or a dict of token ids to biases")
    bias = {}
    for key, entry in value.items():
        key, entry = _python_number(key), _python_number(entry)
        where = f"logit_bias[{key!r}]"
        _check(_is_int(key) and 0 <= key <= MAX_INT, "logit_bias", entry,
               f"keyed by {_TOKEN_ID}", where)
        _check(_is_real(entry) and abs(entry) <= MAX_LOGIT_BIAS, "logit_bias", entry,
               f"a finite number from {-MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}", where)
        bias[key] = float(entry)
    return bias or None


def _allowed_ids(value: object) -> list[int] | None:
    """allowed_token_ids as a list of ints, each once (a body of repeated ids would cost
    the sampler every step), or an InvalidSamplingParam."""
    if value is None:
        return None
    ids = [_python_number(t) for t in _as_list(_python_number(value), "allowed_token_ids", int)]
    _check(bool(ids) and all(_is_int(t) and 0 <= t <= MAX_INT for t in ids),
           "allowed_token_ids", value,
           "None or a non-empty list of token ids (integers from 0 to 2**63 - 1)")
    return list(dict.fromkeys(ids))


class InvalidSamplingParam(ValueError):
    """A SamplingParams field with a bad value: `name` the field, `value` what it got,
    `allowed` what it may be, so that a front end can name the field its own way (a
    command-line flag, a request's field). `where` is the part of the field the message
    names, when that is less than the whole (one entry of logit_bias: logit_bias[7])."""

    def __init__(self, name: str, value: object, allowed: str,
                 where: str | None = None) -> None:
        super().__init__(f"SamplingParams.{where or name}={value!r} is invalid: "
                         f"must be {allowed}")
        self.name, self.value, self.allowed = name, value, allowed


def _check(ok: bool, name: str, value: object, allowed: str, where: str | None = None) -> None:
    if not ok:
        raise InvalidSamplingParam(name, value, allowed, where)
