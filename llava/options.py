"""A method's options, declared once: name, default, and what a value may be.

A method lists its options in :meth:`llava.method.Method.option_defaults`, each as a plain default (any value
accepted) or as an :class:`Option` that also says which values it takes (a fixed set of choices, or
types, optionally None, optionally a lower bound). :func:`apply` sets them on a new instance and checks every
declared one there, once, with one message shape (``"<method>: <option> must be one of (...), got 'x'"``); the
method's own ``__init__`` keeps only the checks that relate several options. ``python -m llava.cli methods NAME``
lists them from the same declaration (:func:`describe`), and a results file records them as the method's
``config()``, whose values are the instance's.
"""

from __future__ import annotations

from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any


@dataclass(frozen=True)
class Option:
    """One option: its ``default``; ``choices`` (the values it takes, None: any of ``types``); ``types`` (the
    Python types a value may have; ``int`` is accepted where ``float`` is, ``bool`` never where ``int`` is);
    ``none``: None is accepted too; ``at_least``: a lower bound for numbers; ``doc``: one line for the listing."""

    default: Any
    choices: tuple | None = None
    types: tuple = ()
    none: bool = False
    at_least: float | None = None
    doc: str = ""

    def problem(self, value) -> str | None:
        """What is wrong with ``value`` (the end of a sentence that starts with the option's name), or None."""
        if value is None and (self.none or self.default is None):
            return None
        if self.choices is not None:
            if value in self.choices:
                return None
            near = did_you_mean(value, [c for c in self.choices if isinstance(c, str)]) if isinstance(value, str) else ""
            return f"must be {'None or ' if self.none else ''}one of {self.choices}, got {value!r}{near}"
        if self.types and not _is(value, self.types):
            names = " or ".join(t.__name__ for t in self.types) + (" or None" if self.none else "")
            return f"must be {'an' if names[0] in 'aeiou' else 'a'} {names}, got {value!r}"
        if self.at_least is not None and value < self.at_least:
            return f"must be >= {self.at_least:g}, got {value!r}"
        return None


def did_you_mean(words, known) -> str:
    """`` (did you mean 'fastv'?)`` for the closest known name to each of ``words`` (a name or several), or "" when
    none is close (difflib's ratio >= 0.6): a misspelling gets the fix beside the list of names."""
    words = [words] if isinstance(words, str) else list(words)
    near = [m[0] for w in words for m in [get_close_matches(str(w).lower(), list(known), n=1)] if m]
    return f" (did you mean {' / '.join(repr(n) for n in near)}?)" if near else ""


def _is(value, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def defaults(declared: dict) -> dict:
    """Each option's default (an :class:`Option`'s ``default``, or the plain value)."""
    return {k: v.default if isinstance(v, Option) else v for k, v in declared.items()}


def apply(method, options: dict) -> None:
    """Set ``method``'s options (its declared defaults, then ``options``) and check every declared one: an unknown
    name is a TypeError (with the closest known name), a value its :class:`Option` does not take a ValueError."""
    declared = type(method).option_defaults()
    unknown = set(options) - set(declared)
    if unknown:
        raise TypeError(f"{method.name}: unknown option(s) {sorted(unknown)}{did_you_mean(sorted(unknown), declared)}; "
                        f"known: {sorted(declared)}")
    for k, v in {**defaults(declared), **options}.items():
        setattr(method, k, v)
    for k, spec in declared.items():
        if isinstance(spec, Option) and (why := spec.problem(getattr(method, k))) is not None:
            raise ValueError(f"{method.name}: {k} {why}")


def describe(declared: dict) -> list[str]:
    """One line per option: name, default, what it takes, its doc."""
    out = []
    for k, spec in declared.items():
        if not isinstance(spec, Option):
            out.append(f"{k} = {spec!r}")
            continue
        takes = (f"one of {spec.choices}" if spec.choices is not None else
                 " or ".join(t.__name__ for t in spec.types) if spec.types else "")
        takes += (" (or None)" if spec.none and takes else "") + (f", >= {spec.at_least:g}"
                                                                  if spec.at_least is not None else "")
        out.append(f"{k} = {spec.default!r}" + (f"  [{takes}]" if takes else "")
                   + (f"  {spec.doc}" if spec.doc else ""))
    return out
