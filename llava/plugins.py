"""A user's methods and model families from outside the repository: the modules named by ``VTPRUNE_METHODS``
(module names or ``.py`` files), the entry points of the group ``vtprune.methods`` (an installed package's modules)
and those of ``vtprune.families`` (an installed package's family records), loaded after the built-in methods by
:func:`load_methods` (docs/your-method.md, docs/models.md). The family registry asks for them too, at a lookup
that finds no family (llava/families/registry.py), so ``llava.load`` of a checkpoint of a user's model class finds
its family."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

#: an installed package's methods: each entry point of this group names a module whose import registers them
ENTRY_POINT_GROUP = "vtprune.methods"
#: an installed package's model families: each entry point of this group names a family record
#: (``module:ATTRIBUTE``, a :class:`llava.families.Family`), registered after the built-in families
FAMILY_GROUP = "vtprune.families"
#: a user's methods without a package: comma-separated module names or paths of .py files, imported after the
#: built-in methods and the entry points (every command reads it: ask, eval run, the scripts, Slurm jobs)
METHODS_VAR = "VTPRUNE_METHODS"


class MethodPluginError(ValueError):
    """A user's module or entry point (``VTPRUNE_METHODS``, ``vtprune.methods``, ``vtprune.families``) failed to
    load, or registered a method name or a family id a built-in has; the command lines print it as one ``error:``
    line."""


def _user_sources() -> list[tuple[str, str]]:
    """(where it was named, module name or file path) of every user method module: entry points, then the
    variable's items in order."""
    from importlib.metadata import entry_points

    out = [(f"entry point {ep.name!r} ({ENTRY_POINT_GROUP})", ep.value.split(":")[0].strip())
           for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)]
    named = os.environ.get("VTPRUNE_METHODS", "")  # METHODS_VAR
    out += [(METHODS_VAR, item.strip()) for item in named.split(",") if item.strip()]
    return out


def _import_user(source: str) -> None:
    if source.endswith(".py") or os.sep in source:  # a file: imported under a name of its own
        path = os.path.abspath(os.path.expanduser(source))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
        name = "vtprune_user_" + "".join(c if c.isalnum() else "_" for c in os.path.splitext(path)[0])
        if name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
        return
    importlib.import_module(source)


_failed: MethodPluginError | None = None
_loaded = False


def load_methods(builtin_modules: list[str]) -> None:
    """Import the modules whose import registers methods, once: the built-in packages (one absent from this
    checkout is skipped), then register the installed packages' families (:func:`load_user_families`), then import
    the user's method modules (:func:`load_user_methods`); a user module or family that failed raises again at
    every later call (never a silent "unknown method" or "unknown family")."""
    global _loaded
    if _loaded:
        return raise_if_failed()
    _loaded = True
    for mod in builtin_modules:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    load_user_families()
    load_user_methods()


def raise_if_failed() -> None:
    if _failed is not None:
        raise _failed


def load_user_methods() -> None:
    """Import every user method module (entry points, then ``VTPRUNE_METHODS``); the first that fails is a
    :class:`MethodPluginError` naming it and its exception, raised again by :func:`raise_if_failed`."""
    global _failed
    raise_if_failed()
    for where, source in _user_sources():
        try:
            _import_user(source)
        except Exception as e:  # noqa: BLE001 - one line naming the module and the exception
            _failed = MethodPluginError(f"cannot load the methods of {source!r} (named by {where}): "
                                        f"{type(e).__name__}: {e}")
            raise _failed from e


def _family_entry_point(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"entry point {ep.name!r}" + (f" of {dist.name!r}" if dist is not None else "") + f" ({FAMILY_GROUP})"


def not_a_family(obj) -> str:
    """Why ``obj``, named by an entry point of ``vtprune.families``, is not registered: it is no family record."""
    if isinstance(obj, type(sys)):
        return "it names a module, not a Family record (name the record: 'module:ATTRIBUTE')"
    return f"it names a {type(obj).__name__}, not a Family record (llava.families.Family)"


#: registers what an entry point of ``vtprune.families`` names, (object, where it was named) -> None, raising where
#: it cannot: set by llava.families.registry when it is imported (the registry imports this module, not the reverse)
_register_family = None


def family_registrar(register) -> None:
    """Set the function :func:`load_user_families` registers each entry point's object with."""
    global _register_family
    _register_family = register


def load_user_families() -> None:
    """Register the family record named by every entry point of ``vtprune.families`` (in order of their names); the
    first that fails (its module does not import, it names no :class:`~llava.families.Family`, its id, tiny name
    or model class is taken) is a :class:`MethodPluginError` naming it, raised again by :func:`raise_if_failed`."""
    global _failed
    from importlib.metadata import entry_points

    raise_if_failed()
    for ep in sorted(entry_points(group=FAMILY_GROUP), key=lambda ep: (ep.name, ep.value)):
        where = _family_entry_point(ep)
        try:
            obj = ep.load()
            if _register_family is None:  # the registry is not imported, so no family record exists
                raise TypeError(not_a_family(obj))
            _register_family(obj, where)
        except Exception as e:  # noqa: BLE001 - one line naming the entry point and the exception
            _failed = MethodPluginError(f"cannot load the family of {ep.value!r} (named by {where}): "
                                        f"{type(e).__name__}: {e}")
            raise _failed from e


def name_taken(name: str, old: type, builtin_roots: list[str]) -> str:
    """Why ``name`` cannot be registered again: a built-in method's name (a user's method must take another), or
    another user class's."""
    if old.__module__.split(".")[0] in builtin_roots:
        return (f"method name {name!r} collides with the built-in method {old.__qualname__} ({old.__module__}): give "
                "the method another name")
    return f"method name {name!r} is already registered by {old.__qualname__}"
