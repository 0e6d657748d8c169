"""YAML configs: safe loading, ``_base_`` inheritance, ``--cfg-options``, ``${name}`` references,
validation against the registries, and dumping.

A config is plain YAML read with a safe loader, so a config file can never run code (mmengine's
``Config.fromfile`` is not used: its YAML handler constructs arbitrary Python objects). The steps
of :func:`load_config`:

1. read the file and, recursively, its ``_base_`` files (paths relative to the including file);
   bases are deep-merged in order, then the file's own keys on top. A mapping with
   ``_delete_: true`` replaces the inherited mapping instead of merging into it;
2. apply ``--cfg-options`` (``KEY=VALUE``, dotted keys with list indices, YAML-typed values);
3. resolve ``${name}`` references to top-level keys: a string that is exactly ``${name}`` takes
   the referenced value with its type, a reference inside a longer string is interpolated.
   ``$${name}`` is a literal ``${name}``. Inside a flow mapping or list (``{...}``, ``[...]``)
   YAML reads ``{`` as syntax, so quote the reference there: ``{num_classes: "${num_classes}"}``.

Because references are resolved after the overrides, ``--cfg-options data_root=DIR
num_classes=K`` retargets every nested setting that refers to them.

The YAML dialect follows the YAML 1.2 core schema where PyYAML's 1.1 rules surprise people:
``1e-4`` is a float (not a string) and only ``true``/``false`` are booleans (``yes``/``no``/
``on``/``off`` stay strings). Duplicate keys in one mapping are an error.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import yaml
from mmengine.config import Config
from yaml.constructor import ConstructorError

from vitasks.checks import check_literal_arguments, flag, strings
from vitasks.errors import ConfigError

__all__ = ["load_config", "as_config", "validate_config", "dump_config", "parse_cfg_options"]

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"
CONFIG_SUFFIXES = (".yaml", ".yml")

# Top-level keys that must have a value as soon as something refers to them: an empty data root
# would silently read from the working directory, an empty class count fails deep in a head.
REQUIRED_WHEN_REFERENCED = {"data_root": "DIR", "num_classes": "K"}


# --------------------------------------------------------------------------------------------
# Safe YAML
# --------------------------------------------------------------------------------------------


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (no Python objects, ever) with YAML 1.2 floats and booleans and a
    duplicate-key check."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen[key_node.value] = key_node
        return super().construct_mapping(node, deep=deep)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
# Copy the resolver table (it is shared with SafeLoader) without YAML 1.1's yes/no/on/off booleans.
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# PyYAML's float pattern needs a dot and a signed exponent; accept ``1e-4``, ``2E5``, ``1.0e5``.
# Appended after the int resolver, so plain integers stay ints.
_ConfigLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+|[-+]?\.[0-9_]+[eE][-+]?[0-9]+)$"
    ),
    list("-+0123456789."),
)


def _yaml_error(source: str, err: yaml.YAMLError) -> ConfigError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{source}, line {mark.line + 1}" if mark is not None else source
    problem = getattr(err, "problem", None) or str(err)
    if isinstance(err, ConstructorError) and "could not determine a constructor" in problem:
        tag = re.search(r"for the tag '([^']*)'", problem)
        tag = tag.group(1).replace("tag:yaml.org,2002:", "!!") if tag else "?"
        return ConfigError(
            f"{where}: the tag {tag} is not allowed: vitasks reads configs with a safe YAML "
            "loader that never creates Python objects (nothing in the file was run)"
        )
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        problem += f" ({context} started at line {context_mark.line + 1})"
    return ConfigError(f"{where}: invalid YAML: {problem}")


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise _yaml_error(source, err) from None


def _read_yaml_file(path: Path, shown: str, missing: str = "") -> Dict[str, Any]:
    """The mapping a YAML config file holds; ``missing``: the message when there is no such file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        not_found = isinstance(err, FileNotFoundError)
        raise ConfigError((missing or f"config file not found: {shown}") if not_found
                          else f"cannot read config file {shown}: {err.strerror or err}") from None
    data = _parse_yaml(text, shown)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: the top level of a config must be a mapping of keys, "
                          f"got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------
# _base_ inheritance
# --------------------------------------------------------------------------------------------


def _join(path: str, key: Any) -> str:
    """Dotted key paths, as --cfg-options takes them (list items by index)."""
    return f"{path}.{key}" if path else str(key)


def _pop_delete(mapping: dict, where: str) -> bool:
    return flag(mapping.pop(DELETE_KEY, False), f"{where}: {DELETE_KEY}")


def _strip_delete(value: Any, where: str) -> Any:
    """A copy of ``value`` without ``_delete_`` flags (they only matter against a base)."""
    if isinstance(value, dict):
        out = dict(value)
        _pop_delete(out, where or "<top level>")
        return {k: _strip_delete(v, _join(where, k)) for k, v in out.items()}
    if isinstance(value, list):
        return [_strip_delete(v, _join(where, i)) for i, v in enumerate(value)]
    return copy.deepcopy(value)


def _merge(base: dict, override: dict, where: str = "") -> dict:
    """Deep merge ``override`` into a copy of ``base``: mappings merge key by key, anything else
    (lists included) replaces; a mapping with ``_delete_: true`` replaces the base mapping."""
    out = dict(base)
    for key, value in override.items():
        path = _join(where, key)
        if isinstance(value, dict):
            value = dict(value)
            replace = _pop_delete(value, path)
            if not replace and isinstance(out.get(key), dict):
                out[key] = _merge(out[key], value, path)
                continue
        out[key] = _strip_delete(value, path)
    return out


def _shown(path: Path) -> str:
    """How a path appears in messages: relative to the working directory when below it."""
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)


def _load_tree(path: Path, shown: str, chain: tuple, missing: str = "") -> Dict[str, Any]:
    real = path.resolve()
    if real in chain:
        cycle = " -> ".join(_shown(p) for p in chain[chain.index(real):] + (real,))
        raise ConfigError(f"{shown}: _base_ files include each other in a cycle: {cycle}")
    data = _read_yaml_file(path, shown, missing)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    bases = strings(bases, f"{shown}: {BASE_KEY}", "a path or a list of paths", single=True)
    merged: Dict[str, Any] = {}
    for base in bases:
        base_path = Path(os.path.normpath(path.parent / os.path.expanduser(base)))
        base_shown = _shown(base_path)
        missing = f"{shown}: {BASE_KEY} file '{base}' not found (looked for {base_shown})"
        merged = _merge(merged, _load_tree(base_path, base_shown, chain + (real,), missing))
    return _merge(merged, data)


# --------------------------------------------------------------------------------------------
# --cfg-options
# --------------------------------------------------------------------------------------------


def parse_cfg_options(options: Optional[Iterable[str]]) -> Dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a.b": 1, "c": [1, 2]}``: values are parsed as YAML (the
    same safe dialect as config files), so ``true``, ``1e-4``, ``[224, 224]`` and ``{k: v}`` get
    their types and anything else stays a string. Later items win over earlier ones.

    Raises:
        ConfigError: an item without ``=``, with an empty key part or with invalid YAML.
    """
    parsed: Dict[str, Any] = {}
    if options is None:
        return parsed
    if isinstance(options, str):
        options = [options]
    for item in options:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"--cfg-options: expected KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        key = _option_key(key.strip(), f" in {item!r}")
        parsed[key] = _parse_yaml(text, f"--cfg-options {key}") if text.strip() else None
    return parsed


def _option_key(key: Any, where: str = "") -> str:
    """A ``--cfg-options`` key: dotted names without an empty part."""
    if not isinstance(key, str) or not key or "" in key.split("."):
        raise ConfigError(f"--cfg-options: malformed key {key!r}{where}: expected dotted names such as "
                          "model.head.num_classes or pipeline.1.p")
    return key


def _describe(value: Any) -> str:
    name = type(value).__name__
    return f"{value!r} ({'an' if name[0] in 'aeiou' else 'a'} {name})"


def _set_dotted(cfg: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth]) or "<top level>"
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            if last:
                if isinstance(value, dict):
                    node[part] = _merge({part: node.get(part)}, {part: value})[part]
                else:
                    node[part] = copy.deepcopy(value)
                return
            if node.get(part) is None:
                node[part] = {}  # a missing or null section is created
            node = node[part]
        elif isinstance(node, list):
            index = int(part) if re.fullmatch(r"-?[0-9]+", part) else None
            if index is None or not -len(node) <= index < len(node):
                raise ConfigError(f"--cfg-options {key}: '{part}' is not an index of {here}, a list of {len(node)} "
                                  f"items (or is out of range: -{len(node)}..{len(node) - 1})")
            if last:
                if isinstance(value, dict) and isinstance(node[index], dict):
                    node[index] = _merge({"v": node[index]}, {"v": value})["v"]
                else:
                    node[index] = _strip_delete(value, key)
                return
            node = node[index]
        else:
            raise ConfigError(f"--cfg-options {key}: {here} is {_describe(node)}, not a "
                              "mapping or a list")


def _parsed_options(options: Union[Sequence[str], Mapping[str, Any], None]) -> Dict[str, Any]:
    """``--cfg-options`` as ``{dotted key: value}`` (strings parsed, a mapping's keys checked)."""
    if options is None:
        return {}
    if isinstance(options, Mapping):
        return {_option_key(key): value for key, value in options.items()}
    return parse_cfg_options(options)


def _mentions(value: Any, text: str) -> bool:
    """Whether ``text`` occurs in any string of the config tree ``value``."""
    if isinstance(value, str):
        return text in value
    if isinstance(value, Mapping):
        return any(_mentions(v, text) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_mentions(v, text) for v in value)
    return False


def _check_retarget_keys(cfg: dict, keys: Sequence[str], source: str) -> None:
    """``--cfg-options data_root=DIR num_classes=K`` on a config that reads neither. A multi-task
    config has a root and a class count per task (``cls_data_root``, ``seg_classes``...): ignoring
    the option would train on the wrong data, so that is an error naming the keys to set. A
    config with nothing of the kind (a depth model has no classes) goes on, with a warning."""
    for key in keys:
        if key not in REQUIRED_WHEN_REFERENCED or key in cfg or _mentions(cfg, "${" + key + "}"):
            continue
        suffix = "_data_root" if key == "data_root" else "_classes"
        instead = [k for k in cfg if isinstance(k, str) and k.endswith(suffix)]
        if instead:
            raise ConfigError(f"{source}: --cfg-options {key}: this config has no top-level {key}; it reads one per "
                              f"task: set {', '.join(instead)}")
        warnings.warn(f"{source}: --cfg-options {key} is ignored: nothing in this config reads a {key}", stacklevel=3)


# --------------------------------------------------------------------------------------------
# ${name} references
# --------------------------------------------------------------------------------------------

# ``$${...}`` is an escaped literal; ``${...}`` a reference.
_REF = re.compile(r"\$(\$\{[^}]*\})|\$\{([^}]*)\}")
_WHOLE_REF = re.compile(r"^\$\{([^}]*)\}$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Resolver:
    """Resolves references in the merged config; each top-level key is resolved once."""

    def __init__(self, cfg: dict, source: str) -> None:
        self.raw = cfg
        self.source = source
        self.done: Dict[str, Any] = {}

    def run(self) -> dict:
        for key in self.raw:
            self._top(key, ())
        return {key: self.done[key] for key in self.raw}

    def _top(self, name: str, chain: tuple) -> Any:
        if name in self.done:
            return self.done[name]
        self.done[name] = self._value(self.raw[name], str(name), chain + (name,))
        return self.done[name]

    def _lookup(self, ref: str, path: str, chain: tuple, whole: bool) -> Any:
        name = ref.strip()
        if not _NAME.match(name):
            raise ConfigError(f"{self.source}: {path}: malformed reference '${{{ref}}}': expected "
                              "${name} with the name of a top-level key")
        if name not in self.raw:
            names = [k for k in self.raw if isinstance(k, str)]
            hint = _did_you_mean(name, names)
            raise ConfigError(f"{self.source}: {path}: unknown reference ${{{name}}}: there is no "
                              f"top-level key '{name}'{hint}")
        if name in chain:
            cycle = " -> ".join(chain[chain.index(name):] + (name,))
            raise ConfigError(f"{self.source}: {path}: references form a cycle: {cycle}")
        value = self._top(name, chain)
        # a data root or class count must be set; any value put into a string must not be null
        if (name in REQUIRED_WHEN_REFERENCED and value in (None, "")) or (value is None and not whole):
            raise ConfigError(
                f"{self.source}: {path} refers to ${{{name}}} but {name} is not set; set it in the config or pass "
                f"--cfg-options {name}={REQUIRED_WHEN_REFERENCED.get(name, '...')}"
            )
        if whole:
            return copy.deepcopy(value)
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{self.source}: {path}: ${{{name}}} is a "
                              f"{'mapping' if isinstance(value, dict) else 'list'} and cannot be "
                              "interpolated into a string; use the reference as the whole value")
        return str(value)

    def _value(self, value: Any, path: str, chain: tuple) -> Any:
        if isinstance(value, dict):
            return {k: self._value(v, f"{path}.{k}", chain) for k, v in value.items()}
        if isinstance(value, list):
            return [self._value(v, f"{path}.{i}", chain) for i, v in enumerate(value)]
        if not isinstance(value, str) or "$" not in value:
            return value
        whole = _WHOLE_REF.match(value)
        if whole:
            return self._lookup(whole.group(1), path, chain, whole=True)

        def substitute(match: "re.Match[str]") -> str:
            if match.group(1) is not None:  # escaped: drop one dollar
                return match.group(1)
            return self._lookup(match.group(2), path, chain, whole=False)

        return _REF.sub(substitute, value)


# --------------------------------------------------------------------------------------------
# load / dump
# --------------------------------------------------------------------------------------------


def load_config(
    path: Union[str, os.PathLike],
    cfg_options: Union[Sequence[str], Mapping[str, Any], None] = None,
) -> Config:
    """Read a YAML config with its bases, apply overrides and resolve references.

    Args:
        path: The ``.yaml``/``.yml`` file.
        cfg_options: ``["KEY=VALUE", ...]`` as given to ``--cfg-options``, or an already parsed
            ``{dotted_key: value}`` mapping.

    Returns:
        An mmengine ``Config`` built from the plain merged dict, with ``filename`` set to ``path``.
        Nothing is imported or validated here: see :func:`validate_config`.

    Raises:
        ConfigError: a missing/unreadable file, invalid YAML, a Python tag, a missing ``_base_``
            file or a cycle, a malformed override, an unknown or unset reference.
    """
    shown = os.fspath(path)
    file = Path(shown)
    if file.suffix.lower() not in CONFIG_SUFFIXES:
        raise ConfigError(f"{shown}: vitasks configs are YAML files ({', '.join(CONFIG_SUFFIXES)});"
                          " Python config files are not executed")
    data = _load_tree(Path(os.path.abspath(file)), shown, ())
    options = _parsed_options(cfg_options)
    _check_retarget_keys(data, list(options), shown)
    for key, value in options.items():
        _set_dotted(data, key, value)
    data = _strip_delete(data, "")
    data = _Resolver(data, shown).run()
    try:
        # format_python_code=False: mmengine otherwise runs yapf over the whole config (seconds
        # for a multi-task config) every time it logs it or saves a checkpoint.
        return Config(data, filename=shown, format_python_code=False)
    except KeyError as err:  # mmengine reserves a few top-level names
        raise ConfigError(f"{shown}: {err.args[0]}") from None


def as_config(config: Union[str, os.PathLike, Config, dict],
              cfg_options: Union[Sequence[str], Mapping[str, Any], None] = None) -> Config:
    """A config path (YAML, :func:`load_config`), or a Config or dict (copied: never modified),
    with ``cfg_options`` applied."""
    if isinstance(config, (str, os.PathLike)):
        return load_config(config, cfg_options)
    if not isinstance(config, (Config, dict)):
        raise ConfigError(f"expected a config path, mmengine Config or dict, got {type(config).__name__}")
    cfg = copy.deepcopy(config) if isinstance(config, Config) else Config(copy.deepcopy(config))
    if cfg_options:
        options = cfg_options if isinstance(cfg_options, Mapping) else parse_cfg_options(cfg_options)
        cfg.merge_from_dict(dict(options), allow_list_keys=True)
    return cfg


def _plain(value: Any, where: str) -> Any:
    """Config values as plain YAML data (tuples become lists)."""
    if isinstance(value, Mapping):
        return {k: _plain(v, _join(where, k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}.{i}") for i, v in enumerate(value)]
    if isinstance(value, str):
        # Keep literal "${" literal when the dump is loaded again.
        return value.replace("${", "$${")
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _plain(value.item(), where)
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"{where}: {_describe(value)} cannot be written to a YAML config")


def dump_config(cfg: Union[Config, Mapping[str, Any]], path: Union[str, os.PathLike]) -> None:
    """Write the merged, resolved config as YAML that :func:`load_config` reads back the same."""
    data = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    text = yaml.safe_dump(_plain(data, ""), sort_keys=False, allow_unicode=True,
                          default_flow_style=False)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

# Keys consumed by mmengine before a component of this registry is built, so they need not be
# constructor arguments.
_RUNNER_KEYS = {
    "hooks": {"priority"},
    "param_schedulers": {"convert_to_iter_based"},
    "optim_wrappers": {"optimizer", "paramwise_cfg", "constructor"},
}
_ALWAYS_ALLOWED = {"type", "_scope_"}

# Arguments whose ``type`` names live in another library, by component name; a class may also
# declare ``config_foreign_types = {"arg": "module"}`` itself.
_FOREIGN_TYPES = {"Albu": {"transforms": "albumentations"}}

# mmengine modules whose import fills its root registries (hooks, loops, optimizers, ...).
_MMENGINE_MODULES = (
    "mmengine.runner",
    "mmengine.hooks",
    "mmengine.optim",
    "mmengine.dataset",
    "mmengine.model",
    "mmengine.evaluator",
    "mmengine.visualization",
)


def _did_you_mean(name: str, candidates: Iterable[str], n: int = 5) -> str:
    candidates = sorted(set(candidates))
    lower = {c.lower(): c for c in candidates}
    close = [lower[name.lower()]] if name.lower() in lower else []
    close += [c for c in difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
              if c not in close]
    return f"; did you mean: {', '.join(close[:n])}" if close else ""


class _Names:
    """Registered names: vitasks' own children (with their classes) and mmengine's roots."""

    def __init__(self) -> None:
        from mmengine.registry import Registry
        import mmengine.registry.root as root

        from vitasks.registry import ALL_REGISTRIES

        self.vitasks: Dict[str, List[tuple]] = {}
        for reg_name, registry in ALL_REGISTRIES.items():
            for name, obj in registry.module_dict.items():
                self.vitasks.setdefault(name, []).append((reg_name, obj))
        self.mmengine = set()
        for value in vars(root).values():
            if isinstance(value, Registry):
                self.mmengine.update(value.module_dict)

    def all(self) -> set:
        return set(self.vitasks) | self.mmengine


def _accepted_args(obj: Any) -> Optional[List[str]]:
    """Keyword arguments of a class or function; None when it takes ``**kwargs`` that cannot be
    followed, or has no readable signature. A class whose ``__init__`` passes ``**kwargs`` on
    accepts its own arguments and those of the next ``__init__`` up its MRO, and so on."""
    owners = obj.__mro__ if isinstance(obj, type) else (obj,)
    accepted: List[str] = []
    for owner in owners:
        if isinstance(obj, type) and "__init__" not in vars(owner):
            continue
        try:
            params = inspect.signature(owner.__init__ if isinstance(obj, type) else owner).parameters.values()
        except (TypeError, ValueError):
            return None
        accepted += [p.name for p in params if p.name != "self" and p.name not in accepted and p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return accepted
        if not isinstance(obj, type):
            return None
    return None


def _check_args(path: str, node: dict, owner: str, accepted: List[str], extra: set) -> List[str]:
    problems = []
    allowed = set(accepted) | extra | _ALWAYS_ALLOWED
    for key in node:
        if key not in allowed:
            hint = _did_you_mean(str(key), accepted, n=3)
            problems.append(
                f"{_join(path, key)}: {owner} has no argument '{key}'{hint}; accepted arguments: "
                f"{', '.join(accepted) if accepted else '(none)'}"
            )
    return problems


class _Validator:
    def __init__(self, names: _Names) -> None:
        self.names = names
        self.problems: List[str] = []

    def walk(self, node: Any, path: str, foreign: Optional[str] = None) -> None:
        if isinstance(node, dict):
            foreign_args: Dict[str, str] = {}
            kind = node.get("type")
            if isinstance(kind, str):
                where = _join(path, "type")
                if foreign is not None:
                    self._check_foreign(node, kind, where, path, foreign)
                else:
                    foreign_args = self._check_registered(node, kind, where, path)
            for key, value in node.items():
                child = _join(path, key)
                self.walk(value, child, foreign_args.get(key, foreign))
        elif isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                self.walk(value, f"{path}.{index}", foreign)

    def _check_registered(self, node: dict, kind: str, where: str, path: str) -> Dict[str, str]:
        scope, _, short = kind.rpartition(".")
        in_vitasks = short in self.names.vitasks and scope in ("", "vitasks")
        in_mmengine = short in self.names.mmengine and scope in ("", "mmengine")
        if not (in_vitasks or in_mmengine):
            hint = _did_you_mean(short, self.names.all())
            if not hint:
                hint = "; run `vitasks list` to see the registered names"
            self.problems.append(f"{where}: '{kind}' is not registered in vitasks{hint}")
            return {}
        if not in_vitasks:
            return {}  # an mmengine component: mmengine checks its own arguments
        foreign: Dict[str, str] = {}
        accepted_all: List[str] = []
        extra: set = set()
        owners = []
        for reg_name, obj in self.names.vitasks[short]:
            accepted = _accepted_args(obj)
            if accepted is None:
                accepted_all = None  # one candidate takes anything
                break
            accepted_all += [a for a in accepted if a not in accepted_all]
            extra |= _RUNNER_KEYS.get(reg_name, set())
            owners.append(getattr(obj, "__name__", short))
        for _, obj in self.names.vitasks[short]:
            foreign.update(_FOREIGN_TYPES.get(short, {}))
            foreign.update(getattr(obj, "config_foreign_types", None) or {})
        if accepted_all is not None:
            self.problems += _check_args(path, node, owners[0], accepted_all, extra)
        for _, obj in self.names.vitasks[short]:  # the same checks as when it is built
            self.problems += check_literal_arguments(obj, node, path)
        return foreign

    def _check_foreign(self, node: dict, kind: str, where: str, path: str, module: str) -> None:
        namespace = importlib.import_module(module)
        obj = getattr(namespace, kind, None)
        if not isinstance(obj, type):
            classes = [n for n, v in vars(namespace).items()
                       if isinstance(v, type) and not n.startswith("_")]
            self.problems.append(f"{where}: '{kind}' is not a transform in {module}"
                                 f"{_did_you_mean(kind, classes)}")
            return
        accepted = _accepted_args(obj)
        if accepted is not None:
            self.problems += _check_args(path, node, f"{module}.{kind}", accepted, set())


def validate_config(cfg: Union[Config, Mapping[str, Any]]) -> None:
    """Check every ``type`` against the registries and the arguments of vitasks' components.

    Imports every vitasks sub-package, the config's ``plugins:`` and the installed plugins
    first, so that everything a config may name is registered. Components of mmengine itself
    are checked only by name (their arguments are mmengine's business); classes registered in
    vitasks' registries must accept every key given (unless they take ``**kwargs``). Inside
    ``Albu(transforms=...)`` the names are albumentations classes and are checked as such.

    Raises:
        ConfigError: listing every problem, each with its key path, e.g.
            ``model.backbone.type: 'VisionTransformr' is not registered in vitasks; did you
            mean: VisionTransformer``.
    """
    from vitasks.plugins import import_plugins, register_all_modules

    register_all_modules()
    import_plugins(cfg)
    for module in _MMENGINE_MODULES:
        importlib.import_module(module)

    data = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    source = getattr(cfg, "filename", None) or "config"
    validator = _Validator(_Names())
    validator.walk(data, "")
    if data.get("kernels") is not None:  # torch | torchvision | auto: the ops' kernels
        from vitasks.models.ops.selection import check_choice

        problem = check_choice(data["kernels"], "kernels")
        if problem:
            validator.problems.append(problem)
    optim_wrapper = data.get("optim_wrapper")
    if isinstance(optim_wrapper, dict) and isinstance(optim_wrapper.get("constructor"), str):
        validator._check_registered({}, optim_wrapper["constructor"], "optim_wrapper.constructor",
                                    "optim_wrapper")
    if validator.problems:
        listing = "\n".join(f"  {p}" for p in validator.problems)
        raise ConfigError(f"{source}: {validator.problems[0]}" if len(validator.problems) == 1
                          else f"{source}: {len(validator.problems)} problems:\n{listing}")
