"""Argument checks for the components a config builds, and the config key each error names.

One way to say what an argument must be: an annotation. ``depth: PositiveInt``,
``img_size: IntPair``, ``pool: OneOf("token", "mean", "none")``, ``out_indices:
BlockIndices("depth")``. :func:`checked` on a component's ``__init__`` checks (and normalises:
an ``IntPair`` becomes a tuple) every annotated argument before the body runs, and
:mod:`vitasks.config`'s validation runs the same checks on a YAML file before anything is
built, so a bad value gets the same message at either time.

Every message names the argument's real config key. While a component is built from a config,
:func:`building` records where: the Runner builds ``model``, a task model builds
``model.<part>`` (``build_part``), a multi-task model builds ``model.tasks.<name>`` and its
parts under it. :func:`config_key` joins that with an argument's name, so a detector's RoI head
says ``model.tasks.det.roi_head.num_classes`` inside a multi-task model and
``model.roi_head.num_classes`` alone. A component built by hand (a test, a notebook) names the
key its class declares as ``config_key`` (``model.backbone``...).

This module imports nothing of vitasks but its errors, so any layer may use it.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Annotated, Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, get_type_hints

from vitasks.errors import ConfigError

__all__ = [
    "Check",
    "PositiveInt",
    "NonNegativeInt",
    "Flag",
    "IntPair",
    "OneOf",
    "InRange",
    "BlockIndices",
    "BlockIndex",
    "OrNone",
    "ListOf",
    "building",
    "config_key",
    "checked",
    "argument_checks",
    "int_pair",
    "positive_int",
    "non_negative_int",
    "flag",
    "strings",
    "one_of",
    "in_range",
    "block_indices",
    "block_index",
    "build_child",
    "options",
    "feature_maps",
    "both_or_neither",
    "not_both",
    "divisible",
    "config_errors",
    "component_class",
]

# The config key of what is being built now, as its parts ("model", "tasks", "det", "roi_head").
_BUILDING: ContextVar[Tuple[str, ...]] = ContextVar("vitasks_building", default=())


@contextmanager
def building(*keys: str, root: Optional[str] = None) -> Iterator[Tuple[str, ...]]:
    """Build components under config key ``keys``, appended to the current key (or to ``root``,
    e.g. ``"model"``, when nothing is being built yet). Dotted parts are split."""
    current = _BUILDING.get() or tuple(p for p in (root or "").split(".") if p)
    parts = current + tuple(p for key in keys for p in str(key).split(".") if p)
    token = _BUILDING.set(parts)
    try:
        yield parts
    finally:
        _BUILDING.reset(token)


def config_key(*names: str, default: str = "") -> str:
    """The dotted config key of ``names`` under the component being built now; ``default`` is the
    component's own key when it is built outside any config (its class's ``config_key``)."""
    base = _BUILDING.get() or tuple(p for p in default.split(".") if p)
    return ".".join((*base, *(n for n in names if n)))


# --------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value: Any, key: str, low: int = 1, what: str = "a positive integer") -> int:
    """An integer (not a bool) >= ``low``."""
    if not _is_int(value) or value < low:
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    return value


def non_negative_int(value: Any, key: str) -> int:
    return positive_int(value, key, 0, "an integer >= 0")


def flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def strings(value: Any, key: str, what: str = "a list of names", single: bool = False,
            allow_empty: bool = True) -> Tuple[str, ...]:
    """A list of non-empty strings (a string alone stands for a list of one when ``single``)."""
    values = [value] if single and isinstance(value, str) else value
    if (isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or (not values and not allow_empty)
            or not all(isinstance(v, str) and v.strip() for v in values)):
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    return tuple(values)


def int_pair(value: Any, key: str, what: str = "a positive int or [height, width]") -> Tuple[int, int]:
    """``N`` or ``[H, W]`` of positive ints, as ``(H, W)``."""
    if _is_int(value):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_int(v) and v > 0 for v in value):
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    return int(value[0]), int(value[1])


def one_of(value: Any, choices: Sequence[Any], key: str, listed: bool = False) -> Any:
    """``value`` if it is among ``choices`` (``listed``: the message lists them as ``a, b``)."""
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}" if listed
                          else f"{key} must be one of {list(choices)}, got {value!r}")
    return value


def in_range(value: Any, key: str, low: Optional[float] = None, high: Optional[float] = None,
             low_open: bool = False, high_open: bool = False) -> Any:
    """A finite number in the interval (``low`` .. ``high``, each end open or closed)."""
    ok = _number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ConfigError(f"{key} must be a number in {_interval(low, high, low_open, high_open)}, got {value!r}")
    return value


def _interval(low, high, low_open, high_open) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def block_index(value: Any, depth: int, key: str) -> int:
    """One block index in ``[-depth, depth)`` (negative counts from the end), as a non-negative int."""
    if not _is_int(value) or not -depth <= value < depth:
        raise ConfigError(f"{key}: {value!r} is not a block index of a depth-{depth} model (expected an integer "
                          f"in [{-depth}, {depth - 1}])")
    return value % depth


def block_indices(values: Any, depth: Optional[int], key: str, allow_empty: bool = True,
                  unique: bool = False) -> Tuple[int, ...]:
    """Block indices in ``[-depth, depth)`` (negative counts from the end), as non-negative ints
    (as given when ``depth`` is None: a model that does not say how many blocks it has); each
    block once when ``unique``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not all(_is_int(v) for v in values):
        raise ConfigError(f"{key} must be a list of block indices, got {values!r}")
    if not values and not allow_empty:
        raise ConfigError(f"{key} must name at least one block")
    if depth is None:
        return tuple(values)
    bad = [v for v in values if not -depth <= v < depth]
    if bad:
        raise ConfigError(f"{key}: block indices {bad} out of range for depth {depth} "
                          f"(valid: {-depth}..{depth - 1})")
    resolved = tuple(v % depth for v in values)
    if unique and len(set(resolved)) != len(resolved):
        raise ConfigError(f"{key} names a block twice (counted from 0: {list(resolved)})")
    return resolved


class Check:
    """A check of one argument, used as ``Annotated[type, check]``. ``__call__(value, key,
    arguments)`` returns the value (normalised) or raises a :class:`ConfigError` naming ``key``;
    ``arguments`` are the other arguments of the call (for checks that depend on one)."""

    #: names of other arguments this check reads (skipped at config time when they are not literals)
    reads: Tuple[str, ...] = ()

    def __call__(self, value: Any, key: str, arguments: Mapping[str, Any]) -> Any:
        raise NotImplementedError


class _Function(Check):
    def __init__(self, function: Callable[..., Any], **options: Any) -> None:
        self.function, self.options = function, options

    def __call__(self, value: Any, key: str, arguments: Mapping[str, Any]) -> Any:
        return self.function(value, key=key, **self.options)

    def __repr__(self) -> str:
        return f"{self.function.__name__}({self.options or ''})"


class _BlockIndices(Check):
    def __init__(self, depth_argument: str, allow_empty: bool, unique: bool = False, single: bool = False) -> None:
        self.reads = (depth_argument,)
        self.allow_empty, self.unique, self.single = allow_empty, unique, single

    def __call__(self, value: Any, key: str, arguments: Mapping[str, Any]) -> Any:
        if self.single:
            return block_index(value, arguments[self.reads[0]], key)
        return block_indices(value, arguments[self.reads[0]], key, self.allow_empty, self.unique)


class _Optional(Check):
    """None passes; anything else goes to ``check``."""

    def __init__(self, check: Check) -> None:
        self.check, self.reads = check, check.reads

    def __call__(self, value: Any, key: str, arguments: Mapping[str, Any]) -> Any:
        return None if value is None else self.check(value, key, arguments)


PositiveInt = Annotated[int, _Function(positive_int)]
NonNegativeInt = Annotated[int, _Function(non_negative_int)]
Flag = Annotated[bool, _Function(flag)]
IntPair = Annotated[Any, _Function(int_pair)]


def OneOf(*choices: Any) -> Any:  # noqa: N802  (reads as a type in a signature)
    return Annotated[Any, _Function(one_of, choices=tuple(choices))]


def InRange(low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,  # noqa: N802
            high_open: bool = False) -> Any:
    return Annotated[float, _Function(in_range, low=low, high=high, low_open=low_open, high_open=high_open)]


def BlockIndices(depth_argument: str = "depth", allow_empty: bool = True, unique: bool = False) -> Any:  # noqa: N802
    return Annotated[Any, _BlockIndices(depth_argument, allow_empty, unique)]


def BlockIndex(depth_argument: str = "depth") -> Any:  # noqa: N802
    """One block index (``at_block: BlockIndex("depth")``), as a non-negative int."""
    return Annotated[int, _BlockIndices(depth_argument, allow_empty=False, single=True)]


def OrNone(annotation: Any) -> Any:  # noqa: N802
    """``OrNone(PositiveInt)``: None, or what ``annotation`` accepts."""
    return Annotated[Any, _Optional(_check_of(annotation))]


class _ListOf(Check):
    """A list (or tuple) whose every entry passes ``check`` (any entry when None); empty only
    when ``allow_empty``; a value of the types ``single`` stands for a list of it alone."""

    def __init__(self, check: Optional[Check], allow_empty: bool, single: Any = (),
                 length: Optional[int] = None) -> None:
        self.check, self.allow_empty, self.single, self.length = check, allow_empty, single, length
        self.reads = check.reads if check is not None else ()

    def __call__(self, value: Any, key: str, arguments: Mapping[str, Any]) -> Any:
        if self.single and isinstance(value, self.single):
            value = [value]
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if not value and not self.allow_empty:
            raise ConfigError(f"{key} must not be empty")
        if self.length is not None and len(value) != self.length:
            raise ConfigError(f"{key} must be a list of {self.length} values, got {list(value)!r}")
        if self.check is None:
            return tuple(value)
        return tuple(self.check(v, f"{key}[{i}]", arguments) for i, v in enumerate(value))


def ListOf(annotation: Any, allow_empty: bool = False, single: Any = (),  # noqa: N802
           length: Optional[int] = None) -> Any:
    """``ListOf(PositiveInt)``: a list of what ``annotation`` accepts (as a tuple), each entry's
    message naming ``key[i]``; not empty unless ``allow_empty``; exactly ``length`` entries when
    given. ``single`` (a type or a tuple of types): such a value alone means a list of one
    (``ListOf(object, single=dict)``: one config or a list of them)."""
    return Annotated[Any, _ListOf(_check_of(annotation), allow_empty, single, length)]


def _check_of(annotation: Any) -> Optional[Check]:
    for extra in getattr(annotation, "__metadata__", ()):
        if isinstance(extra, Check):
            return extra
    return None


@functools.lru_cache(maxsize=None)
def argument_checks(function: Callable) -> Dict[str, Check]:
    """The :class:`Check` of each annotated argument of ``function`` (an ``__init__``)."""
    function = getattr(function, "__vitasks_unchecked__", function)
    try:
        hints = get_type_hints(function, include_extras=True)
    except Exception:  # noqa: BLE001  (an annotation that cannot be resolved has no check)
        return {}
    return {name: check for name, hint in hints.items() if (check := _check_of(hint)) is not None}


def checked(init: Callable) -> Callable:
    """Decorate a component's ``__init__``: every argument annotated with a :class:`Check` is
    checked (and normalised) before the body runs, its message naming the config key
    (:func:`config_key` under the class's ``config_key``)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        checks = argument_checks(init)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        default = getattr(type(self), "config_key", "")
        for name, check in checks.items():
            if name in bound.arguments:
                bound.arguments[name] = check(bound.arguments[name], config_key(name, default=default),
                                              bound.arguments)
        return init(*bound.args, **bound.kwargs)

    wrapper.__vitasks_unchecked__ = init
    return wrapper


def check_literal_arguments(cls: Any, node: Mapping[str, Any], path: str) -> list:
    """Config-time: the problems :func:`checked` would raise for the literal values in ``node``
    (a component's config at key ``path``); values that are components or references are left
    to build time."""
    init = getattr(cls, "__init__", None)
    if not callable(init) or not hasattr(init, "__vitasks_unchecked__"):
        return []
    problems = []
    for name, check in argument_checks(init).items():
        if name not in node or isinstance(node[name], dict):
            continue
        if any(r not in node for r in check.reads):
            continue
        try:
            check(node[name], f"{path}.{name}" if path else name, node)
        except ConfigError as err:
            problems.append(str(err))
        except (TypeError, KeyError):  # a value of another kind: the build reports it
            continue
    return problems


def options(cfg: Any, key: str, accepted: Optional[Sequence[str]] = None, what: str = "a dict",
            required: Sequence[str] = (), owner: str = "", given: Optional[Mapping[str, Any]] = None,
            parent: str = "") -> Dict[str, Any]:
    """The option dict ``cfg`` at config key ``key`` (a child component's config, or a dict of
    options), as a new dict: it must be a mapping holding the ``required`` keys (else "``key`` must
    be ``what``"), with keys among ``accepted`` when given (``owner``: the class that takes them).
    ``given`` are arguments the ``parent`` (its config key) sets: the config may leave them out or
    repeat the parent's value; they are added to the result."""
    if not isinstance(cfg, Mapping) or any(k not in cfg for k in required):
        raise ConfigError(f"{key} must be {what}, got {cfg!r}")
    cfg = dict(cfg)
    for arg, value in (given or {}).items():
        if arg in cfg and cfg[arg] != value:
            raise ConfigError(f"{key}.{arg} is {cfg[arg]!r} but the {arg} of {parent} is {value!r}; set it on "
                              f"{parent} only")
        cfg[arg] = value
    unknown = sorted((k for k in cfg if k not in set(accepted)), key=str) if accepted is not None else []
    if unknown:
        raise ConfigError(f"{key}: unknown keys {unknown}{f' (unknown arguments of {owner})' if owner else ''}; "
                          f"expected some of {sorted(k for k in accepted if k not in (given or {}))}")
    return cfg


def both_or_neither(key: str, **values: Any) -> None:
    """Two (or more) arguments that go together: all None or none (``mean`` and ``std``)."""
    if len({v is None for v in values.values()}) > 1:
        names = list(values)
        raise ConfigError(f"{key}: give both {' and '.join(names)}, or neither")


def not_both(key: str, **values: Any) -> None:
    """Arguments that exclude each other: at most one set (not None, 0 or False)."""
    given = [name for name, value in values.items() if value is not None and value is not False and value != 0]
    if len(given) > 1:
        raise ConfigError(f"{key}: give either {' or '.join(values)}, not both")


@contextmanager
def config_errors(key: str, *kinds: type) -> Iterator[None]:
    """A ValueError (or one of ``kinds``) raised inside, by a layer or op built from the config at
    ``key``, becomes a ConfigError naming that key (a ConfigError that names it already passes; a
    KeyError, e.g. a registry's unknown type, says its message unquoted)."""
    try:
        yield
    except kinds or (ValueError,) as error:
        if isinstance(error, ConfigError) and str(error).startswith(key):
            raise
        raise ConfigError(f"{key}: {error.args[0] if isinstance(error, KeyError) and error.args else error}") from error


def component_class(kind: Any, registry: Any, key: str, what: str = "model component",
                    choices: Optional[Sequence[str]] = None, base: Optional[type] = None) -> Any:
    """The class a config's ``type`` names (a registered name, or the class itself) at config key
    ``key`` (the dict holding the ``type``): a ConfigError naming the nearest of ``choices`` (the
    registry's names when None) unless it is registered (and a subclass of ``base``, when given)."""
    cls = registry.get(kind) if isinstance(kind, str) else kind
    if cls is None or (base is not None and not (isinstance(cls, type) and issubclass(cls, base))):
        near = difflib.get_close_matches(str(kind), list(choices or registry.module_dict), n=1)
        raise ConfigError(f"{key}.type: {kind!r} is not a registered {what}"
                          f"{f' (did you mean {near[0]!r}?)' if near else ''}"
                          f"{f'; expected one of {list(choices)}' if choices else ''}")
    return cls


def divisible(key: str, **values: int) -> None:
    """``divisible(key, embed_dim=768, num_heads=12)``: the first value a multiple of the second."""
    (name, value), (by, divisor) = values.items()
    if value % divisor:
        raise ConfigError(f"{key}: {name} ({value}) must be divisible by {by} ({divisor})")


def feature_maps(features: Sequence[Any], expected: int, key: str, what: str, at_least: bool = False,
                 source: str = "the backbone's out_indices") -> None:
    """The feature maps a neck or head got against the ``expected`` count its config ``key`` set
    (one per ``what``; more are fine with ``at_least``)."""
    if len(features) < expected or (len(features) != expected and not at_least):
        raise ConfigError(f"{key}: got {len(features)} feature maps for {expected} {what}; {source} must give "
                          f"{'at least ' if at_least else ''}one map per entry")


def build_child(cfg: Any, key: str, registry: Any, owner: str = "", **inject: Any) -> Any:
    """Build the child component ``key`` of the one being built from ``{type: ..., ...}`` in
    ``registry``, with ``inject`` added (an argument the config may not set itself). An already
    built object passes through."""
    if cfg is None or not isinstance(cfg, dict):
        return cfg
    options(cfg, config_key(key), what=f"a dict with a `type`{f' ({owner})' if owner else ''}", required=("type",))
    clash = sorted(set(cfg) & set(inject))
    if clash:
        raise ConfigError(f"{config_key(key)}: {', '.join(clash)} is set by {owner or 'its parent'}; "
                          "leave it out of the config")
    with building(key):
        return registry.build({**cfg, **inject})
