"""Validated, immutable records: agents, dispatch requests and the scoring policy.

Everything that reaches a kernel passes through here first, so the kernels never see a bad value.
Strings that the platform compares loosely (regions, labels) are normalised once, on the way in.

Inputs are strict because agents and clients are not trusted (DESIGN section 3): a bool is not a
number, a string is valid Unicode (no lone surrogates), a length is measured on the string as sent
(after trimming, before lower-casing), every number is finite and within its field's range, and
every set has a bound. Each bad value is a pydantic ``ValidationError`` whose location is the field.
The primitives below (:func:`valid_text`, :func:`real_number`, :func:`epoch_seconds`, the
normalisers) raise ``ValueError`` and are shared with :mod:`scoring.checks`, which checks the
arguments of the fleet's and the pick's calls the same way.
"""

from __future__ import annotations

import itertools
import math
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, cast
from uuid import UUID

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    model_validator,
)

from scoring.hashing import stable_hash64
from scoring.layout import FAILURE_STEPS, VRAM_STEPS_PER_GB, VRAM_UNKNOWN
from scoring.rules import ELIGIBLE_STATUSES, FACTORS, LAST_ELIGIBLE_STATUS
from scoring.rules import REASONS as REASONS  # re-exported: the reason names live with the rules

# FACTORS (scoring factors, in the order the kernels store them) and REASONS (hard-filter reason
# codes, in the order of their bits in the reject mask) are declared with their rules.

MAX_NAME_LEN = 64  # regions and labels
MAX_ID_LEN = 256  # agent ids, tie keys, GPU names
MAX_PATH_LEN = 1024  # model paths
MAX_SLOTS = 2**16 - 1
MAX_LABELS = 64  # labels of an agent, required labels of a request
MAX_MODELS = 256  # cached models of an agent, required models of a request
MAX_EXCLUDED = 1024  # agents a request excludes
MAX_WEIGHT = 1e6  # so that the sum of the weights is finite
#: The largest VRAM the fleet can store: the largest ``vram_gb`` code that is not the unknown
#: code, in GB. With quarter-GB steps in a uint16 (VRAM_UNKNOWN = 65535): 65534 / 4 = 16383.5.
#: (16383.75 was accepted before and stored as code 65535, read back as unknown.)
MAX_VRAM_GB = (VRAM_UNKNOWN - 1) / VRAM_STEPS_PER_GB
MAX_LOCALITY_WAIT_S = 86_400.0  # a day: longer than any task is worth waiting for a warm agent
#: Latest accepted time, seconds since the epoch: the end of 9999-12-31 UTC (253402300800.0;
#: ``datetime.max`` rounds to it as a float), so every UTC ``datetime`` fits.
MAX_TIMESTAMP = datetime.max.replace(tzinfo=UTC).timestamp()


def running_count(committed: int, in_flight: int = 0) -> int:
    """The running-count rule a dispatcher reports to its Fleet: the reservations committed (in
    the database) plus those in flight (placed, not yet committed), at most ``MAX_SLOTS``.

    >>> running_count(3, 2), running_count(MAX_SLOTS, 1)
    (5, 65535)
    """
    return min(committed + in_flight, MAX_SLOTS)


class AgentStatus(StrEnum):
    """Lifecycle state an agent reports; only ``idle`` and ``busy`` agents can take a task."""

    IDLE = "idle"
    BUSY = "busy"
    SYNCING = "syncing"
    TUNNEL = "tunnel"
    UNHEALTHY = "unhealthy"


#: Kernel code of each status (the fleet's ``status`` column holds these).
STATUS_CODES: dict[AgentStatus, int] = {s: i for i, s in enumerate(AgentStatus)}
# Statuses whose code is at most LAST_ELIGIBLE_STATUS are eligible (scoring.rules): they come first
assert [s.value for s in AgentStatus][: LAST_ELIGIBLE_STATUS + 1] == list(ELIGIBLE_STATUSES)


# --- primitives shared with scoring.checks -------------------------------------------------------

# Python strings hold surrogate code points only unpaired (a pair is never combined), and no
# valid Unicode text contains one: such a string cannot be encoded, hashed or stored.
_SURROGATE = re.compile("[\ud800-\udfff]")


def show(value: Any) -> str:
    """A short, always printable description of a rejected value, for error messages.

    ``repr`` of a huge integer raises (Python limits int-to-text conversion) and ``repr`` of a long
    string would flood a log, so neither is used as is.
    """
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**18:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not replace the validation error
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def valid_text(value: Any, what: str) -> str:
    """``value`` as a plain ``str`` if it is a string of valid Unicode, else ``ValueError``."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    text = str.__str__(value)  # a plain str: a subclass cannot override strip() or lower()
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise ValueError(
            f"{what} is not valid Unicode (lone surrogate U+{ord(bad.group()):04X} at index "
            f"{bad.start()})"
        )
    return text


def _bounded_text(value: Any, what: str, max_len: int) -> str:
    """Valid text, trimmed; its length is measured here, before any lower-casing."""
    text = valid_text(value, what).strip()
    if len(text) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")
    return text


def _lowered_name(value: Any, what: str, max_len: int) -> str:
    """Valid text, trimmed and lower-cased; its length is measured on the string as sent.

    One character lower-cases to two: ``"İ"`` (U+0130) becomes ``"i̇"`` (``i`` and U+0307, the
    combining dot above). A sent ``"İ" * 40`` is 40 characters and valid, so its stored form,
    80 characters long, must validate again (the fleet rebuilds records from stored names, and
    copies re-validate); the pair ``"i̇"`` therefore counts as one character either way.
    """
    text = valid_text(value, what).strip()
    if len(text) - text.count("i\u0307") > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")
    return text.lower()


def real_number(value: Any, what: str) -> float:
    """A finite real number as a float: ints (any size that fits a float), floats and numpy real
    scalars; never a bool, NaN or an infinity. Raises ``ValueError`` naming ``what``."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be a number, not a bool")
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{what} is too large ({show(value)})") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {show(value)}")
    return number


def epoch_seconds(value: Any, what: str) -> float:
    """Seconds since the epoch from a number or a ``datetime`` (naive means UTC), checked to lie
    within ``[0, MAX_TIMESTAMP]``. Raises ``ValueError`` naming ``what``."""
    if isinstance(value, datetime):
        try:
            seconds = (value.replace(tzinfo=UTC) if value.tzinfo is None else value).timestamp()
        except (ArithmeticError, ValueError, TypeError):  # a tzinfo giving a bad offset
            raise ValueError(f"{what} is not a usable datetime ({show(value)})") from None
    else:
        seconds = real_number(value, what)
    if not 0.0 <= seconds <= MAX_TIMESTAMP:
        raise ValueError(
            f"{what} must be seconds since the epoch between 0 and {MAX_TIMESTAMP:.0f} "
            f"(year 9999), got {show(value)}"
        )
    return seconds


def to_epoch_seconds(value: Any) -> Any:
    """Accept a ``datetime`` (naive means UTC) wherever seconds since the epoch are expected.

    Anything else is returned as is, for the caller's own checks; :func:`epoch_seconds` is the
    strict form.
    """
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    return value


def normalize_region(value: Any) -> str | None:
    """Trim and lower-case a region; empty or ``None`` means unknown (``None``).

    The length limit applies to the trimmed string as sent: lower-casing may lengthen it
    (``"İ".lower()`` has two characters), which must not turn a valid region into a too long one.
    """
    if value is None:
        return None
    return _lowered_name(value, "region", MAX_NAME_LEN) or None


def _normalize_label(value: Any, what: str = "label") -> str:
    label = _lowered_name(value, what, MAX_NAME_LEN)
    if not label:
        raise ValueError(f"{what} is empty")
    return label


def _name(value: Any, what: str, max_len: int) -> str:
    name = _bounded_text(value, what, max_len)
    if not name:
        raise ValueError(f"{what} is empty")
    return name


def name_set(
    value: Any, what: str, limit: int, normalize: Callable[[Any, str], str]
) -> frozenset[str]:
    """A bounded set of names: ``None`` is empty, a single string is an error.

    Any iterable of strings will do (a mapping gives its keys: the simulation passes its LRU
    cache, an ``OrderedDict``). At most ``limit`` entries are read (counted as sent, duplicates
    included), so a hostile collection costs bounded work whatever its size.
    """
    if value is None:
        return frozenset()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{what} must be a set of strings, got {type(value).__name__}")
    names = set()
    for i, entry in enumerate(value):
        if i >= limit:
            raise ValueError(f"{what} has more than {limit} entries")
        names.add(normalize(entry, f"{what} entry"))
    return frozenset(names)


def normalize_names(
    value: Any, what: str = "names", limit: int = MAX_MODELS, max_len: int = MAX_PATH_LEN
) -> frozenset[str]:
    """Model paths and agent ids: trimmed, case kept, never empty, at most ``limit`` of them."""
    return name_set(value, what, limit, lambda v, w: _name(v, w, max_len))


def _optional_text(value: Any, what: str = "text") -> str | None:
    if value is None:
        return None
    return _bounded_text(value, what, MAX_ID_LEN) or None


_GPU_TOKEN = re.compile(r"[a-z]+|[0-9]+")


def gpu_tokens(name: str) -> frozenset[str]:
    """Normalised tokens of a GPU name: runs of letters or of digits, lower-cased.

    ``"RTX_4090"`` gives ``{"rtx", "4090"}``, a subset of the tokens of
    ``"NVIDIA GeForce RTX 4090"``; a preference matches a GPU when its tokens are such a subset.
    """
    return frozenset(_GPU_TOKEN.findall(name.lower()))


def _preferred_gpu(value: Any) -> str | None:
    text = _optional_text(value, "preferred_gpu")
    if text is not None and not gpu_tokens(text):
        raise ValueError("preferred_gpu must contain a letter or a digit")
    return text


def _agent_id(value: Any) -> str:
    text = valid_text(value, "agent_id")
    if not text:
        raise ValueError("agent_id is empty")
    if text != text.strip():
        raise ValueError("agent_id must not start or end with whitespace")
    if len(text) > MAX_ID_LEN:
        raise ValueError(f"agent_id is longer than {MAX_ID_LEN} characters")
    return text


def _tie_key(value: Any) -> str:
    text = valid_text(value, "tie_key")  # hashed as UTF-8: must be valid Unicode
    if len(text) > MAX_ID_LEN:
        raise ValueError(f"tie_key is longer than {MAX_ID_LEN} characters")
    return text


# --- field types -------------------------------------------------------------------------------
# Each number field is pydantic-strict (no strings, no bools) after a before-validator that turns
# numpy scalars into Python numbers and rejects bools (numpy's too) and ints too large for a float
# with a ValueError, so pydantic reports them as errors of the field.


def _field(info: ValidationInfo) -> str:
    return info.field_name or "value"


def _float_input(value: Any, info: ValidationInfo) -> Any:
    if value is None or isinstance(value, float):
        return value
    if isinstance(value, (bool, np.bool_, int, np.integer, np.floating)):
        return real_number(value, _field(info))
    return value  # pydantic's strict float reports anything else


def _int_input(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{_field(info)} must be an integer, not a bool")
    if isinstance(value, np.integer):
        return int(value)
    return value


def _quarter_gb(value: float | None) -> float | None:
    """VRAM down to the fleet's step (a quarter GB), as the fleet stores it (never more than
    the agent has)."""
    return None if value is None else math.floor(value * VRAM_STEPS_PER_GB) / VRAM_STEPS_PER_GB


def _failure_steps(value: float) -> float:
    """A failure rate to the nearest step of the fleet's (1/32768), as the fleet stores it."""
    return round(value * FAILURE_STEPS) / FAILURE_STEPS


def _bool_input(value: Any) -> Any:
    return bool(value) if isinstance(value, np.bool_) else value


def _timestamp_input(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, datetime):
        return epoch_seconds(value, _field(info))
    return _float_input(value, info)


def _labels_input(value: Any, info: ValidationInfo) -> frozenset[str]:
    return name_set(value, _field(info), MAX_LABELS, _normalize_label)


def _models_input(value: Any, info: ValidationInfo) -> frozenset[str]:
    return normalize_names(value, _field(info), MAX_MODELS, MAX_PATH_LEN)


def _agent_ids_input(value: Any, info: ValidationInfo) -> frozenset[str]:
    return normalize_names(value, _field(info), MAX_EXCLUDED, MAX_ID_LEN)


def _text_input(value: Any, info: ValidationInfo) -> str | None:
    return _optional_text(value, _field(info))


def _uuid_input(value: Any, info: ValidationInfo) -> Any:
    """A UUID or its string form (DESIGN section 3), nothing else: pydantic's lax UUID would take
    any 16 raw bytes (``b"0123456789abcdef"``) or an integer-like value as an id."""
    if isinstance(value, UUID):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{_field(info)} must be a UUID or its string form, got "
                         f"{type(value).__name__}")  # fmt: skip
    return valid_text(value, _field(info))


Slots = Annotated[int, Strict(), Field(ge=0, le=MAX_SLOTS), BeforeValidator(_int_input)]
Capacity = Annotated[int, Strict(), Field(ge=1, le=MAX_SLOTS), BeforeValidator(_int_input)]
StrictFlag = Annotated[bool, Strict(), BeforeValidator(_bool_input)]
Fraction = Annotated[
    float, Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False), BeforeValidator(_float_input)
]
Gigabytes = Annotated[
    float,
    Strict(),
    Field(ge=0.0, le=MAX_VRAM_GB, allow_inf_nan=False),
    BeforeValidator(_float_input),
]
Weight = Annotated[
    float,
    Strict(),
    Field(ge=0.0, le=MAX_WEIGHT, allow_inf_nan=False),
    BeforeValidator(_float_input),
]
Timestamp = Annotated[
    float,
    Strict(),
    Field(ge=0.0, le=MAX_TIMESTAMP, allow_inf_nan=False),
    BeforeValidator(_timestamp_input),
]
Region = Annotated[str | None, BeforeValidator(normalize_region)]
Labels = Annotated[frozenset[str], BeforeValidator(_labels_input)]
Names = Annotated[frozenset[str], BeforeValidator(_models_input)]
AgentIds = Annotated[frozenset[str], BeforeValidator(_agent_ids_input)]
OptionalText = Annotated[str | None, BeforeValidator(_text_input)]
#: A UUID, given as one or as its string form (never raw bytes).
Uuid = Annotated[UUID, BeforeValidator(_uuid_input)]


class cached:  # a decorator, named like functools.cached_property
    """``functools.cached_property`` without its lock.

    Python 3.11's ``cached_property`` takes a lock on every first read (about 8 us, measured);
    a record is immutable, so two threads computing the same value at once is harmless. The
    value is stored in the instance's ``__dict__``, where later reads find it directly.
    """

    def __init__(self, func: Any) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)
        return value


class _Record(BaseModel):
    """Frozen, validated record whose copies are validated too.

    Records cache derived values (:class:`cached`) in the instance. Pydantic's own
    ``model_copy(update=...)`` copies those caches and skips validation, so a copy could carry
    a stale derived value or an invalid field; here a copy is a new, validated record instead.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, ignored_types=(cached,)
    )

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**fields, **(update or {})})


class Agent(_Record):
    """What the platform knows about one connected agent.

    ``gpu_capacity`` and ``running_count`` are at most 65,535 (the fleet stores them as uint16 to
    stay within 64 bytes per agent). An agent carries at most 64 labels and 256 cached models.
    """

    agent_id: Annotated[str, BeforeValidator(_agent_id)]
    team_id: Uuid
    status: AgentStatus
    labels: Labels = frozenset()
    last_heartbeat: Timestamp
    gpu_capacity: Capacity
    running_count: Slots = 0
    region: Region = None
    community_opt_in: StrictFlag = False
    vram_gb: Annotated[Gigabytes | None, AfterValidator(_quarter_gb)] = None
    gpu_model: OptionalText = None
    cached_models: Names = frozenset()
    failure_rate: Annotated[Fraction, AfterValidator(_failure_steps)] = 0.0


class Numbering:
    """Numbers for values, so that grouping or looking them up costs an int's hash.

    Different values never share a number (numbers are never reused). Equal values share one
    unless the table filled up (``limit``) and was cleared between their first lookups; callers
    only lose a cache hit or a grouping then, never correctness. Bounded whatever values arrive.
    """

    def __init__(self, limit: int = 65_536) -> None:
        self.limit = limit
        self._numbers: dict[Any, int] = {}
        self._next = itertools.count()

    def __call__(self, value: Any) -> int:
        number = self._numbers.get(value)
        if number is None:
            if len(self._numbers) >= self.limit:
                self._numbers.clear()
            number = self._numbers.setdefault(value, next(self._next))
        return number


#: :attr:`DispatchRequest.queue_entry`'s fields, as a numpy dtype and as a ``struct`` format.
QUEUE_ENTRY = np.dtype(
    [("kind_id", "<i8"), ("tie_key_hash", "<u8"), ("submitted_at", "<f8"), ("n_excluded", "<i8")]
)
QUEUE_ENTRY_STRUCT = struct.Struct("<qQdq")
assert QUEUE_ENTRY.itemsize == QUEUE_ENTRY_STRUCT.size
TEMPLATES = Numbering()  # DispatchRequest.template_id
KINDS = Numbering()  # DispatchRequest.kind_id
TRANSLATIONS = Numbering()  # DispatchRequest.translation_id


class DispatchRequest(_Record):
    """One task asking for an agent: who submits it, from where, and what it needs.

    ``submitted_at`` (seconds since the epoch or a ``datetime``; ``None`` means now) orders a queue
    in :func:`scoring.assign` and bounds how long a request may wait for a warm agent.
    """

    team_id: Uuid
    target_pool: Literal["team", "community"] = "team"
    submitter_region: Region = None
    tool_type: Literal["comfyui", "nerfstudio"] = "comfyui"
    required_labels: Labels = frozenset()
    min_vram_gb: Gigabytes | None = None
    #: agents whose failure_rate is above this are not eligible (``failures``); None: any
    max_failure_rate: Fraction | None = None
    preferred_gpu: Annotated[str | None, BeforeValidator(_preferred_gpu)] = None
    required_models: Names = frozenset()
    exclude_agents: AgentIds = frozenset()
    tie_key: Annotated[str, BeforeValidator(_tie_key)] = ""
    submitted_at: Timestamp | None = None

    @cached
    def template(self) -> tuple[Any, ...]:
        """Everything but the tie key and the submission time that decides which agents are
        eligible and how they score: requests with equal templates rank a fleet alike."""
        return (*self.kind, self.exclude_agents)

    @cached
    def kind(self) -> tuple[Any, ...]:
        """:attr:`template` without ``exclude_agents``: requests of one kind score every agent
        alike and differ at most in a few agents they exclude (retried tasks), so
        :func:`scoring.assign` serves them from one heap and bounds their deferrals together."""
        # the team as its int: a tuple's hash is not kept, and a UUID hashes in Python
        return (self.team_id.int, self.labels_needed,
                *(getattr(self, name) for name in _KIND_FIELDS))  # fmt: skip

    @cached
    def kind_id(self) -> int:
        """A number for :attr:`kind`, as :attr:`template_id` is for the template."""
        return KINDS(self.kind)

    @cached
    def template_id(self) -> int:
        """A number for :attr:`template` (:class:`Numbering`: different templates never share
        one): grouping a queue by it costs an int's hash instead of the template's (a tuple's
        hash is not kept, and two equal templates compare their sets element by element)."""
        return TEMPLATES(self.template)

    @cached
    def translation_id(self) -> int:
        """A number for the fields a fleet translates into bit masks and tables (required labels
        and models, region, preferred GPU); the key of ``scoring.query``'s cache."""
        return TRANSLATIONS((self.labels_needed, self.required_models, self.submitter_region,
                             self.preferred_gpu))  # fmt: skip

    @cached
    def labels_needed(self) -> frozenset[str]:
        """Required labels plus the tool type, which is itself a required label."""
        return self.required_labels | {self.tool_type}

    @cached
    def queue_entry(self) -> bytes:
        """``kind_id``, the tie key's hash, ``submitted_at`` (NaN: submitted now) and the number
        of excluded agents packed as :data:`QUEUE_ENTRY` (int64, uint64, float64, int64): what
        :func:`scoring.assign` reads of a
        queued request, one object a request that a queue's entries are joined from into one
        array without a conversion per number. A waiting request is offered to every assignment
        until it is placed; reading three attributes and converting them took 1.9 ms a queue of
        10,000, this 0.9 ms (measured, the requests out of cache)."""
        at = self.submitted_at
        return QUEUE_ENTRY_STRUCT.pack(self.kind_id, int(self.tie_key_hash),
                                       math.nan if at is None else at,
                                       len(self.exclude_agents))  # fmt: skip

    @cached
    def tie_key_hash(self) -> np.uint64:
        """Stable 64-bit hash of ``tie_key`` (:mod:`scoring.hashing`), as the kernels take it."""
        return np.uint64(stable_hash64(self.tie_key))

    def excluding(self, agents: frozenset[str]) -> DispatchRequest:
        """This request with ``agents`` added to ``exclude_agents``: a validated copy, as
        :meth:`model_copy` makes it.

        Only ``agents`` are validated: every other field is this record's, valid already. The
        last copy is kept in the instance and returned again for the same ``agents`` (a waiting
        request is offered round after round, often under the same slot holds). In the
        simulation's scorer, :func:`scoring.holds.restrict` copying every held-back request by
        :meth:`model_copy` (all fields validated again) was 30% of its time under cProfile.
        """
        kept = self.__dict__.get("_excluding")
        if kept is not None and kept[0] == agents:
            return cast(DispatchRequest, kept[1])
        try:
            excluded = self.exclude_agents | normalize_names(
                agents, "exclude_agents", MAX_EXCLUDED, MAX_ID_LEN
            )
        except ValueError:
            excluded = None
        if excluded is None or len(excluded) > MAX_EXCLUDED:  # the ValidationError to raise
            update = {"exclude_agents": self.exclude_agents | frozenset(agents)}
            return cast(DispatchRequest, self.model_copy(update=update))
        fields = {name: self.__dict__[name] for name in type(self).model_fields}  # no caches
        fields["exclude_agents"] = excluded
        # pydantic's shallow copy, its fields (and which are set) as model_copy makes them
        copy = self.__copy__()
        object.__setattr__(copy, "__dict__", fields)
        object.__setattr__(copy, "__pydantic_fields_set__", set(fields))
        self.__dict__["_excluding"] = (agents, copy)
        return copy


#: What decides which agents a request may use and how they score, besides its team (as an int),
#: its labels (:attr:`DispatchRequest.labels_needed`) and its exclusions: every other field but
#: the tie key and the submission time (a new field is part of a request's kind by itself).
_KIND_FIELDS = tuple(
    name
    for name in DispatchRequest.model_fields
    if name
    not in ("team_id", "required_labels", "tool_type", "exclude_agents", "tie_key", "submitted_at")
)


class Weights(_Record):
    """Non-negative weight of each scoring factor; reads like a mapping (``weights["load"]``).

    Each weight is at most ``MAX_WEIGHT`` (1e6), so their sum, the score's denominator, is finite.
    """

    # Defaults chosen by replaying a production Stable Diffusion trace through the fleet
    # simulation (evidence: notebooks/WEIGHTS.md): warm models matter twice as much as the rest;
    # preferring the team's own agent costs latency, so it stays small but positive.
    region: Weight = 1.0
    load: Weight = 1.0
    pool: Weight = 0.5
    warm: Weight = 2.0
    gpu: Weight = 1.0
    reliability: Weight = 1.0

    @model_validator(mode="after")
    def _not_all_zero(self) -> Weights:
        if not any(getattr(self, f) > 0 for f in FACTORS):
            raise ValueError("at least one weight must be positive")
        return self

    def __getitem__(self, factor: str) -> float:
        if factor not in FACTORS:
            raise KeyError(factor)
        return float(getattr(self, factor))

    def keys(self) -> tuple[str, ...]:
        return FACTORS

    def items(self) -> list[tuple[str, float]]:
        return [(f, self[f]) for f in FACTORS]

    @cached
    def array(self) -> np.ndarray:
        """float64[7]: the six weights in ``FACTORS`` order, then their sum (read-only)."""
        values = [self[f] for f in FACTORS]
        a = np.array([*values, sum(values)], dtype=np.float64)
        a.flags.writeable = False
        return a


AffinityPairs = tuple[tuple[tuple[str, str], float], ...]


def _affinity_pairs(value: Any) -> Any:
    """Accept ``{("us-east", "us-west"): 0.6}`` (or its pairs) and store it canonically.

    A pair's key must be a tuple or list of two region strings: a plain string such as ``"ab"``
    would otherwise unpack into the regions ``"a"`` and ``"b"``.
    """
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items: Iterable[Any] = value.items()
    elif isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(
            f"must map (region_a, region_b) pairs to affinities, got {type(value).__name__}"
        )
    else:
        items = value
    canonical: dict[tuple[str, str], float] = {}
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError("each entry must be ((region_a, region_b), affinity)")
        pair, affinity = item
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(
                f"each key must be a pair of two regions such as ('us-east', 'us-west'), "
                f"got {show(pair)}"
            )
        ra, rb = normalize_region(pair[0]), normalize_region(pair[1])
        if ra is None or rb is None:
            raise ValueError("affinity regions must be non-empty")
        if ra == rb:
            raise ValueError(f"pair ({ra!r}, {rb!r}) names one region; same region is always 1.0")
        value_of = real_number(affinity, f"affinity of ({ra!r}, {rb!r})")
        if not 0.0 <= value_of <= 1.0:
            raise ValueError(f"affinity of ({ra!r}, {rb!r}) must be within [0, 1]")
        key = (min(ra, rb), max(ra, rb))
        if key in canonical and canonical[key] != value_of:
            raise ValueError(f"pair {key} is given twice with different affinities")
        canonical[key] = value_of
    return tuple(sorted(canonical.items()))


class ScoringPolicy(_Record):
    """Weights, staleness timeout, region affinities, tie band and locality wait: validated once,
    then immutable.

    ``region_affinity`` is stored as sorted ``((a, b), affinity)`` pairs with ``a < b``; read it
    with :meth:`affinity`. ``tie_band`` is at most 1 (scores lie in [0, 1], so a wider band
    changes nothing). ``locality_wait_s`` is how long :func:`scoring.assign` may hold a request
    back for a warm agent (0 never defers; at most a day). Its default, 60 s, comes from replaying
    the production trace at loads 0.1 to 0.3 (notebooks/WEIGHTS.md): cold loads fall from
    0.33-0.47 to 0.15-0.32 and the e2e p95 by 4-9% where queues are long.

    ``deferrals_per_slot`` bounds how many requests of one kind (their template apart from
    ``exclude_agents``: :attr:`DispatchRequest.kind`) ``assign`` defers in a call:
    at most this many per busy slot of the warm agents they wait for, oldest first (each slot
    frees when its run ends, so a deferral beyond them waits for a second run to end: longer
    than the cold load it avoids). The rest load cold at once. ``MAX_SLOTS`` is no bound in
    practice (delay scheduling as published). Default 1, from the replay (notebooks/WEIGHTS.md).
    """

    weights: Weights = Weights()
    heartbeat_timeout_s: Annotated[
        float,
        Strict(),
        Field(gt=0.0, le=MAX_TIMESTAMP, allow_inf_nan=False),
        BeforeValidator(_float_input),
    ] = 30.0
    region_affinity: Annotated[AffinityPairs, BeforeValidator(_affinity_pairs)] = ()
    tie_band: Fraction = 0.0
    locality_wait_s: Annotated[
        float,
        Strict(),
        Field(ge=0.0, le=MAX_LOCALITY_WAIT_S, allow_inf_nan=False),
        BeforeValidator(_float_input),
    ] = 60.0
    deferrals_per_slot: Capacity = 1

    @cached
    def affinity_map(self) -> Mapping[tuple[str, str], float]:
        """Both orders of every configured pair."""
        table: dict[tuple[str, str], float] = {}
        for (a, b), value in self.region_affinity:
            table[(a, b)] = table[(b, a)] = value
        return table

    def affinity(self, a: str, b: str) -> float:
        """Region factor of two known, normalised regions: 1 if equal, else the pair's, else 0."""
        if a == b:
            return 1.0
        return self.affinity_map.get((a, b), 0.0)


DEFAULT_POLICY = ScoringPolicy()
