"""Plugins: code that registers extra components into the vitasks registries.

A plugin runs only when something names it:

- a config lists it under ``plugins:``, either as an importable module name
  (``my_package.my_module``) or as a path, relative to the config file, to a ``.py`` file or a
  package folder (``../plugins/cosine_head/vitasks_cosine_head``);
- an installed distribution declares an entry point in the group ``vitasks.plugins``. The entry
  point names a module (imported) or a function (``module:register``, called once with no
  arguments).

Importing a plugin registers its components (``@MODELS.register_module()`` etc.), after which a
config can name them by ``type``. See ``plugins/README.md`` for writing one.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Mapping, Optional, Set

from vitasks.checks import strings
from vitasks.errors import ConfigError

__all__ = ["ENTRY_POINT_GROUP", "import_plugins", "register_all_modules", "entry_point_plugins",
           "provider_of"]

ENTRY_POINT_GROUP = "vitasks.plugins"

# Every sub-package that registers components; the registries' ``locations`` name the same ones.
SUBPACKAGES = (
    "vitasks.models",
    "vitasks.data",
    "vitasks.evaluation",
    "vitasks.engine",
    "vitasks.visualization",
)

# Entry points already loaded in this process ("name = value"): a ``register`` function must
# not run twice (mmengine refuses to register a name twice).
_LOADED_ENTRY_POINTS: Set[str] = set()

# Top-level module name of every plugin imported in this process -> who asked for it, for
# `vitasks list` ("plugin vt_x (config exp.yaml)", "vitasks-depth (entry point depth)").
_PLUGIN_PROVIDERS: Dict[str, str] = {}


def _top(module_name: str) -> str:
    return module_name.split(".", 1)[0]


def provider_of(module_name: str) -> str:
    """Which package provided a component defined in ``module_name``.

    ``vitasks`` and ``mmengine`` for their own modules; for a plugin, its module and what named it
    (a config or an installed entry point); for other code, the installed distribution that holds
    it; an empty string when nothing is known (code registered at run time by a script).
    """
    top = _top(module_name or "")
    if top in ("vitasks", "mmengine"):
        return top
    if top in _PLUGIN_PROVIDERS:
        return _PLUGIN_PROVIDERS[top]
    try:
        dists = metadata.packages_distributions().get(top)
    except Exception:  # a broken installed METADATA must not break listing
        dists = None
    return dists[0] if dists else ""


def _registering_module(err: KeyError) -> Optional[str]:
    """The module whose class mmengine refused (the ``module`` being registered), from the traceback."""
    tb = err.__traceback__
    found = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_register_module":
            found = getattr(frame.f_locals.get("module"), "__module__", None)
        tb = tb.tb_next
    return found


def _duplicate_name_error(err: KeyError, origin: str) -> Optional[ConfigError]:
    """mmengine's ``KeyError("X is already registered in models at a.b")`` as a ConfigError that
    names both modules; None for any other KeyError."""
    message = err.args[0] if err.args and isinstance(err.args[0], str) else ""
    if " is already registered in " not in message:
        return None
    name, rest = message.split(" is already registered in ", 1)
    registry, _, existing = rest.partition(" at ")
    new = _registering_module(err) or "?"
    return ConfigError(
        f"{origin}: module '{new}' registers '{name}' in registry '{registry}', but module "
        f"'{existing}' already registered that name; rename one of them (two plugins, or a plugin "
        "and vitasks, cannot share a component name)")


def _run_import(load, origin: str, fix: str = "", unloadable: tuple = (ImportError,)):
    """Run ``load()`` (an import), turning the plugin mistakes a user can fix into ConfigErrors:
    a duplicate component name, a syntax error, a module that cannot be imported (an
    ``unloadable`` error; ``fix`` says what to do)."""
    try:
        return load()
    except unloadable as err:
        raise ConfigError(f"{origin} cannot be imported: {err}{fix}") from err
    except KeyError as err:
        error = _duplicate_name_error(err, origin)
        if error is None:
            raise
        raise error from err
    except SyntaxError as err:
        raise ConfigError(f"{origin}: syntax error in {err.filename}, line {err.lineno}: "
                          f"{err.msg}") from err


def register_all_modules(init_default_scope: bool = False) -> None:
    """Import every vitasks sub-package so that all built-in components are registered.

    Args:
        init_default_scope: Also make ``vitasks`` mmengine's current default scope (what the
            Runner does from ``default_scope: vitasks``), for building components outside a Runner.
    """
    for name in SUBPACKAGES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a dependency of the sub-package is missing: a real error
                raise
    if init_default_scope:
        import datetime

        from mmengine.registry import DefaultScope

        current = DefaultScope.get_current_instance()
        if current is None or current.scope_name != "vitasks":
            # The newest instance is the current one; reusing an old name would not make it so.
            name = "vitasks"
            if DefaultScope.check_instance_created(name):
                name = f"vitasks-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
            DefaultScope.get_instance(name, scope_name="vitasks")


def _is_path(entry: str) -> bool:
    return "/" in entry or os.sep in entry or entry.endswith(".py")


def _import_path(entry: str, base_dir: Path, source: str) -> ModuleType:
    """Import a module file or package folder named by a path in a config."""
    target = Path(os.path.normpath(base_dir / os.path.expanduser(entry)))
    if (target / "__init__.py").is_file():
        name, file, search = target.name, target / "__init__.py", [str(target)]
    elif target.is_file() and target.suffix == ".py":
        name, file, search = target.stem, target, None
    else:
        raise ConfigError(f"{source}: plugins: '{entry}' not found (looked for {target}: a .py file or a folder with "
                          "__init__.py)")
    loaded = sys.modules.get(name)
    if loaded is not None:
        if os.path.realpath(getattr(loaded, "__file__", "") or "") == os.path.realpath(file):
            return loaded
        raise ConfigError(f"{source}: plugins: '{entry}' would be imported as module '{name}', "
                          f"but another module of that name is already loaded "
                          f"({getattr(loaded, '__file__', None)})")
    spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=search)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        _run_import(lambda: spec.loader.exec_module(module), f"{source}: plugins: '{entry}'")
    except BaseException:
        del sys.modules[name]
        raise
    _PLUGIN_PROVIDERS.setdefault(name, f"plugin {name} (config {os.path.basename(source)})")
    return module


def _import_listed(entry: str, base_dir: Path, source: str) -> str:
    entry = entry.strip()
    if _is_path(entry):
        return _import_path(entry, base_dir, source).__name__
    _run_import(lambda: importlib.import_module(entry), f"{source}: plugins: module '{entry}'",
                "; install the plugin package, put it on PYTHONPATH, or give a path relative to the config file")
    _PLUGIN_PROVIDERS.setdefault(_top(entry),
                                 f"plugin {_top(entry)} (config {os.path.basename(source)})")
    return entry


def entry_point_plugins() -> List[metadata.EntryPoint]:
    """The installed entry points of group ``vitasks.plugins`` (one per name and value)."""
    try:
        found = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python 3.9: a dict of groups
        found = metadata.entry_points().get(ENTRY_POINT_GROUP, [])
    unique = {}
    for ep in found:
        unique.setdefault(f"{ep.name} = {ep.value}", ep)
    return list(unique.values())


def _load_entry_point(ep: metadata.EntryPoint) -> str:
    key = f"{ep.name} = {ep.value}"
    if key in _LOADED_ENTRY_POINTS:
        return ep.value
    dist = getattr(getattr(ep, "dist", None), "name", None)
    origin = f"installed plugin '{key}'" + (f" (distribution {dist})" if dist else "")
    obj = _run_import(ep.load, f"{origin} in entry-point group {ENTRY_POINT_GROUP}", "; reinstall or uninstall it",
                      unloadable=(ImportError, AttributeError))
    module = ep.value.split(":", 1)[0].strip()
    _PLUGIN_PROVIDERS.setdefault(
        _top(module), f"{dist or 'plugin ' + _top(module)} (entry point {ep.name})")
    if callable(obj) and not isinstance(obj, (type, ModuleType)):
        _run_import(obj, origin, unloadable=())
    _LOADED_ENTRY_POINTS.add(key)
    return ep.value


def import_plugins(cfg: Optional[Mapping[str, Any]] = None, entry_points: bool = True) -> List[str]:
    """Import the config's ``plugins:`` and the installed entry-point plugins.

    Args:
        cfg: A config (mmengine ``Config`` or dict) or None; its ``plugins`` key is a list of
            module names or paths relative to the config file (``cfg.filename``).
        entry_points: Also load every entry point of group ``vitasks.plugins``.

    Returns:
        The names of the modules (and entry-point values) imported.

    Raises:
        ConfigError: a listed module or an installed entry point that cannot be imported.
    """
    imported: List[str] = []
    if cfg is not None:
        listed = cfg.get("plugins") if hasattr(cfg, "get") else None
        source = getattr(cfg, "filename", None) or "config"
        listed = strings([] if listed is None else listed, f"{source}: plugins",
                         "a list of module names or paths (or one)", single=True)
        base_dir = Path(os.path.dirname(os.path.abspath(source))) if source != "config" else Path()
        imported += [_import_listed(entry, base_dir, source) for entry in listed]
    if entry_points:
        imported += [_load_entry_point(ep) for ep in entry_point_plugins()]
    return imported
