"""Hypothesis strategies for the run contract: workflows, their file stores, and bodies.

Three kinds of body, from wild to tame:

- :func:`json_bodies`: any JSON value at all (objects, arrays, NaN, huge ints, odd keys);
- :func:`near_valid_bodies`: built from the workflow's ParameterDefs, each field independently
  valid, wrong, junk, null or omitted, so most bodies fail in one or two places only;
- :func:`valid_bodies`: every field valid, so the run must be accepted.

A :class:`Scenario` pairs a workflow with a file store holding, for each file parameter, an
upload of the submitting team that its ``accept`` allows, plus decoys (another team's upload,
a disallowed type, an upload with no content type).
"""

from __future__ import annotations

import math
import string
import uuid
from dataclasses import dataclass
from typing import Any

from hypothesis import reject
from hypothesis import strategies as st
from pydantic import ValidationError

from scoring.contract import FileInfo, InMemoryFileStore, ParameterDef, Workflow

TEAM = uuid.UUID("7f9c2a52-0d1e-4b7a-9a43-5a1f0c3b2d10")
OTHER_TEAM = uuid.UUID("0c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f")
TOP_LEVEL = ("parameters", "dispatch_target", "target_pool", "submitter_region", "tool_type")
ACCEPT_PATTERNS = ("image/*", "image/png", "video/*", "application/pdf", "*/*")
# Stored content types: matching and non-matching ones, in odd spellings the contract normalises.
CONTENT_TYPES = ("image/png", "IMAGE/JPEG", "image/png; charset=binary", "video/mp4",
                 "application/pdf", "text/plain", None)  # fmt: skip

# --- any JSON --------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)  # beyond float range
    | st.floats()  # NaN and infinities included: bodies are untrusted input
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

# --- workflows -------------------------------------------------------------------------------

param_keys = st.text(string.ascii_letters + string.digits + "_-.", min_size=1, max_size=10)
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False) | st.integers(-(10**6), 10**6)


@st.composite
def parameter_defs(draw: st.DrawFn, key: str) -> ParameterDef:
    """A self-consistent ParameterDef of any type, with or without bounds, options and default."""
    kind = draw(st.sampled_from(["string", "number", "boolean", "select", "file"]))
    required = draw(st.booleans())
    fields: dict[str, Any] = {"key": key, "type": kind, "required": required}
    with_default = not required and kind != "file" and draw(st.booleans())
    if kind == "number":
        low, high = draw(st.none() | finite), draw(st.none() | finite)
        if low is not None and high is not None and low > high:
            low, high = high, low
        fields |= {"min": low, "max": high}
        if with_default:
            fields["default"] = draw(numbers_within(low, high))
    elif kind == "select":
        options = draw(st.lists(st.text(max_size=6), min_size=1, max_size=4, unique=True))
        fields["options"] = options
        if with_default:
            fields["default"] = draw(st.sampled_from(options))
    elif kind == "file":
        fields["accept"] = draw(
            st.none() | st.lists(st.sampled_from(ACCEPT_PATTERNS), min_size=1, max_size=3)
        )
    elif with_default:
        fields["default"] = draw(st.text(max_size=8) if kind == "string" else st.booleans())
    if draw(st.booleans()):
        fields |= {"node_id": str(draw(st.integers(1, 99))), "field": key}
    return ParameterDef(**fields)


def numbers_within(low: float | None, high: float | None) -> st.SearchStrategy[int | float]:
    """Ints and finite floats within the (inclusive, optional) bounds."""
    # -0.0 equals 0.0 as a bound, but Hypothesis orders the two: floats(0.0, -0.0) is an error
    low = 0.0 if low == 0 else low
    high = 0.0 if high == 0 else high
    floats = st.floats(low, high, allow_nan=False, allow_infinity=False)
    lo = None if low is None else math.ceil(low)
    hi = None if high is None else math.floor(high)
    if lo is not None and hi is not None and lo > hi:
        return floats  # no integer fits between the bounds
    return st.integers(lo, hi) | floats


@dataclass(frozen=True)
class Scenario:
    """A workflow and the uploads its runs may name; ``good_files[key]`` fits parameter ``key``."""

    workflow: Workflow
    store: InMemoryFileStore
    good_files: dict[str, str]
    bad_files: tuple[str, ...]  # another team's, or never uploaded: never valid
    own_files: tuple[str, ...]  # the team's, of every content type: valid where accept allows


def content_type_for(accept: tuple[str, ...] | None) -> str:
    """A stored content type (spelled oddly on purpose) that the ``accept`` patterns allow."""
    pattern = (accept or ("*/*",))[0]
    if pattern == "*/*":
        return "application/octet-stream"
    major, _, minor = pattern.partition("/")
    return f"{major.upper()}/x-test; q=1" if minor == "*" else pattern.upper()


@st.composite
def mostly(draw: st.DrawFn, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
    """``good`` four times in five, else ``bad`` (``|`` would split them evenly)."""
    return draw(bad if draw(st.integers(0, 4)) == 2 else good)


# --- what a workflow asks of agents, tame and hostile -------------------------------------------

# Strings a workflow's author might store where a run copies them into its DispatchRequest:
# punctuation only, blanks, a non-breaking space, exactly and just over 64 characters, a letter
# whose lower case is longer than itself ("İ"), a lone surrogate, and ordinary names.
EDGE_TEXT = ("---", "", "   ", "\u00a0", "_", "RTX_4090", " GPU ", "İ" * 33, "İ" * 64, "x" * 64,
             "x" * 65, "\ud800", "m/sdxl base.safetensors")  # fmt: skip
hostile_text = (
    st.sampled_from(EDGE_TEXT) | st.text(max_size=70) | st.text("İ -_aZ9\t.", max_size=70)
)
hostile_sets = mostly(
    st.sets(hostile_text, max_size=3),
    st.lists(st.none() | st.integers() | hostile_text, min_size=1, max_size=2)
    | hostile_text
    | st.integers()
    | st.none(),
)
hostile_numbers = (
    st.floats()  # NaN, infinities and negatives included
    | st.integers(-(10**400), 10**400)
    | st.booleans()
    | st.sampled_from(["8", "", "nan", "-1", "1e400"])
)


#: For each Workflow field that flows into the DispatchRequest, values of any kind.
HOSTILE_NEEDS: dict[str, st.SearchStrategy[Any]] = {
    "required_labels": hostile_sets,
    "preferred_gpu": mostly(hostile_text, st.integers() | st.booleans() | st.lists(hostile_text)),
    "min_vram_gb": hostile_numbers,
    "required_models": hostile_sets,
    "tool_type": st.sampled_from(["comfyui", "nerfstudio", "ComfyUI", " comfyui", "a1111", None])
    | hostile_text,
}


TAME_NEEDS: dict[str, st.SearchStrategy[Any]] = {
    "required_labels": st.sets(st.sampled_from(["gpu", "sdxl", "a100"]), max_size=2),
    "preferred_gpu": st.sampled_from([None, "RTX_4090"]),
    "min_vram_gb": st.sampled_from([None, 8, 24.5]),
    "required_models": st.sets(st.sampled_from(["m/a.safetensors", "m/b.ckpt"])),
}


def builds_with(name: str, value: Any) -> bool:
    """Whether a workflow accepts ``value`` for its field ``name``."""
    try:
        Workflow(id=TEAM, slug="wf", team_id=TEAM, **{name: value})
    except ValidationError:
        return False
    return True


@st.composite
def scenarios(draw: st.DrawFn, active: bool | None = None, hostile: bool = False) -> Scenario:
    """A workflow (active or not, unless ``active`` says) with its file store.

    With ``hostile``, each thing the workflow asks of agents is a value drawn from
    :data:`HOSTILE_NEEDS` when a workflow accepts it (tried on its own first, so that no draw is
    wasted), else a tame one: "any workflow that builds", not only the tame ones.
    """
    keys = draw(st.lists(param_keys, max_size=6, unique=True))
    params = [draw(parameter_defs(k)) for k in keys]
    tool_type = draw(st.sampled_from(["comfyui", "nerfstudio"]))
    targets = [None, "agent"] + (["comfy_cloud"] if tool_type == "comfyui" else [])
    if active is None:
        status = draw(st.sampled_from(["active"] * 7 + ["disabled"]))
    else:
        status = "active" if active else "disabled"
    needs = {name: draw(values) for name, values in TAME_NEEDS.items()}
    for name in TAME_NEEDS if hostile else ():
        value = draw(HOSTILE_NEEDS[name])
        if builds_with(name, value):
            needs[name] = value
    try:
        workflow = Workflow(
            id=uuid.UUID(int=draw(st.integers(0, 2**128 - 1))),
            slug="wf",
            team_id=TEAM,
            tool_type=tool_type,
            default_dispatch_target=draw(st.sampled_from(targets)),
            status=status,
            parameters=params,
            **needs,
        )
    except ValidationError:
        if hostile:
            reject()  # values fine one by one but refused together: not a workflow that builds
        raise
    files, good = [], {}
    for p in params:
        if p.type == "file":
            good[p.key] = f"inputs/{TEAM}/{p.key}/ok"
            files.append(FileInfo(good[p.key], TEAM, content_type_for(p.accept)))
    bad, own = [], []
    for i, ctype in enumerate(CONTENT_TYPES):
        bad.append(f"inputs/{OTHER_TEAM}/{i}/theirs")
        files.append(FileInfo(bad[-1], OTHER_TEAM, ctype))
        own.append(f"inputs/{TEAM}/{i}/mine")
        files.append(FileInfo(own[-1], TEAM, ctype))
    bad.append(f"inputs/{TEAM}/never-uploaded")
    return Scenario(workflow, InMemoryFileStore(files), good, tuple(bad), tuple(own))


# --- bodies ----------------------------------------------------------------------------------


def valid_value(p: ParameterDef, scenario: Scenario) -> st.SearchStrategy[Any]:
    """Values the definition accepts."""
    if p.type == "string":
        return st.text(max_size=20)
    if p.type == "number":
        return numbers_within(p.min, p.max)
    if p.type == "boolean":
        return st.booleans()
    if p.type == "select":
        return st.sampled_from(p.options or ())
    return st.just(scenario.good_files[p.key])


def invalid_value(p: ParameterDef, scenario: Scenario) -> st.SearchStrategy[Any]:
    """Values of the wrong type, out of range, not an option, or a file key that does not fit."""
    wrong_type = st.sampled_from(
        [None, True, False, "12", math.nan, math.inf, -math.inf, [], {}, 3, "x"]
    ).filter(lambda v: not _accepted_by_type(p, v))
    if p.type == "number" and (p.min is not None or p.max is not None):
        outside = []
        if p.min is not None:
            outside.append(st.floats(max_value=p.min, exclude_max=True, allow_nan=False))
        if p.max is not None:
            outside.append(st.floats(min_value=p.max, exclude_min=True, allow_nan=False))
        return wrong_type | st.one_of(outside)
    if p.type == "select":
        return wrong_type | st.text(max_size=6).filter(lambda v: v not in (p.options or ()))
    if p.type == "file":
        return wrong_type | st.sampled_from(scenario.bad_files)
    return wrong_type


def _accepted_by_type(p: ParameterDef, value: Any) -> bool:
    """Whether ``value`` has the definition's JSON type (the decoys must not)."""
    if p.type == "boolean":
        return isinstance(value, bool)
    if p.type == "number":
        return not isinstance(value, bool) and isinstance(value, int)
    return isinstance(value, str)


def region_values(valid: bool) -> st.SearchStrategy[Any]:
    """Regions of at most 64 characters after trimming (possibly padded), or too long ones."""
    alphabet = string.ascii_letters + string.digits + "-"
    if valid:
        core = st.text(alphabet, max_size=64)
        return st.tuples(st.sampled_from(["", " ", "\t "]), core, st.sampled_from(["", "  "])).map(
            "".join
        )
    return st.text(alphabet, min_size=65, max_size=80) | st.integers() | st.lists(st.none())


@st.composite
def valid_bodies(draw: st.DrawFn, scenario: Scenario) -> dict[str, Any]:
    """A body every rule accepts (for an active ``scenario.workflow``)."""
    workflow = scenario.workflow
    params = {}
    for p in workflow.parameters:
        if p.required or draw(st.booleans()):
            params[p.key] = draw(valid_value(p, scenario))
    body: dict[str, Any] = {}
    if params or draw(st.booleans()):
        body["parameters"] = params
    targets = ["agent"] + (["comfy_cloud"] if workflow.tool_type == "comfyui" else [])
    options = {
        "dispatch_target": st.sampled_from(targets),
        "target_pool": st.sampled_from(["team", "community"]),
        "submitter_region": region_values(valid=True),
        "tool_type": st.just(workflow.tool_type),
    }
    for name, values in options.items():
        if draw(st.booleans()):
            body[name] = draw(st.none() | values)
    return body


@st.composite
def near_valid_bodies(draw: st.DrawFn, scenario: Scenario) -> Any:
    """A body whose every field is independently valid (mostly), wrong, junk, null or omitted.

    Most bodies break one or two rules, some none, so both outcomes are explored near the edge.
    """
    params: dict[Any, Any] = {}
    for p in scenario.workflow.parameters:
        how = draw(
            st.sampled_from(["omit"] * 3 + ["valid"] * 12 + ["invalid"] * 2 + ["junk", "own"])
        )
        if how == "own" and p.type == "file":
            params[p.key] = draw(st.sampled_from(scenario.own_files))  # allowed or not by accept
        elif how == "invalid":
            params[p.key] = draw(invalid_value(p, scenario))
        elif how == "junk":
            params[p.key] = draw(json_values)
        elif how != "omit" or (p.required and draw(st.integers(0, 3))):
            params[p.key] = draw(valid_value(p, scenario))
    if draw(st.integers(0, 7)) == 3:
        params[draw(param_keys)] = draw(json_values)  # maybe unknown, maybe replaces a value
    body: dict[Any, Any] = {}
    if params or draw(st.booleans()):
        broken = draw(st.integers(0, 9)) == 5
        body["parameters"] = draw(st.none() | json_values) if broken else params
    tool_types = st.sampled_from([scenario.workflow.tool_type, "comfyui", "nerfstudio"])
    bad_enum = mostly(st.sampled_from(["public", "AGENT", "", "a1111", "gpu"]), json_values)
    fields = {
        "dispatch_target": mostly(st.sampled_from(["agent", "comfy_cloud"]), bad_enum),
        "target_pool": mostly(st.sampled_from(["team", "community"]), bad_enum),
        "submitter_region": mostly(region_values(True), region_values(False)),
        "tool_type": mostly(tool_types, bad_enum),
    }
    for name, values in fields.items():
        if draw(st.booleans()):
            body[name] = draw(st.none() | values)
    if draw(st.integers(0, 9)) == 5:
        body[draw(st.text(max_size=8))] = draw(json_values)  # stray top-level field
    return body


def json_bodies() -> st.SearchStrategy[Any]:
    """Any JSON value, biased toward objects that use the contract's field names."""
    return json_values | st.dictionaries(st.sampled_from(TOP_LEVEL), json_values, max_size=5)
