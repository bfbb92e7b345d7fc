"""Settings declared once: a config dataclass field carries its default, its help and what
it admits (`opt(24, "batch size", ge=1)`); `Valid.check` is the one test of a value against
it, for the CLI's flags, --config files, sweep files and search spaces alike, so a mistake
reads the same wherever it is made (`--batch-size must be >= 1, got 0`). Torch-free: the CLI
checks every argument before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ekx import EkxError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


@dataclass(frozen=True)
class Names:
    """A registry's names, kept torch-free beside its config (a test holds them equal to the
    registry's built-in ones). A name is accepted in any case and with ``_`` for ``-``
    (``cross_attention``); ``families`` are the ``family:`` prefixes of open-ended names
    (``timm:<model>``); ``plugins`` are names registered at run time by the user's own code
    (the registry's ``register`` adds them), accepted from then on."""

    what: str
    known: tuple[str, ...]
    families: tuple[str, ...] = ()
    plugins: set[str] = field(default_factory=set, compare=False)

    def __iter__(self) -> Iterator[str]:
        return iter((*self.known, *sorted(self.plugins)))

    def __str__(self) -> str:
        return ", ".join(self)

    def add(self, name: str) -> None:
        """A registry's ``register``: a name beyond the built-in ones becomes valid."""
        if name not in self.known:
            self.plugins.add(name)

    def canonical(self, name: str) -> str:
        spelt = {_key(n): n for n in self}
        if _key(name) in spelt:
            return spelt[_key(name)]
        family, colon, _ = name.partition(":")
        if colon and family in self.families:
            return name
        if colon:
            known = f"families: {', '.join(self.families)}" if self.families else "none has a family: prefix yet"
            raise EkxError(f"unknown {self.what} family {family!r} ({self.what}s: {self}; {known})")
        close = difflib.get_close_matches(_key(name), list(spelt), n=1)
        hint = f"; did you mean {spelt[close[0]]!r}?" if close else ""
        raise EkxError(f"unknown {self.what} {name!r}{hint} ({self.what}s: {self})")

    def complete(self, incomplete: str) -> list[str]:
        """Shell completion; in a comma list (``resnet50,eff``), of its last name."""
        head, comma, last = incomplete.rpartition(",")
        return [head + comma + n for n in self if n.startswith(last)]


@dataclass(frozen=True)
class Valid:
    """What a field admits: bounds (``ge``/``gt``/``le``/``lt``), ``choices`` (a tuple, or
    `Names` of a registry, ``several`` of them separated by commas where ``several``), or a
    ``pattern`` the whole value matches (``shown`` says it in words). None always passes: it
    is an optional field's "not set"."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | Names | None = None
    several: bool | str = False  # True: separated by commas; a string: that separator ("+": fused)
    pattern: str | None = None
    shown: str = ""
    multiple: int | None = None  # an integer multiple of this (0 included; ge/gt bound it)

    def describe(self) -> str:
        if self.choices is not None:
            return f"one or more of {', '.join(self.choices)}" if self.several else f"one of {', '.join(self.choices)}"
        if self.pattern is not None:
            return self.shown
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        said = [f"{op} {v:g}" for op, v in bounds if v is not None]
        return " and ".join(said + ([f"a multiple of {self.multiple}"] if self.multiple else []))

    def admits(self, value: Any) -> bool:
        if self.pattern is not None:
            return re.fullmatch(self.pattern, str(value)) is not None
        if self.choices is not None:
            return value in self.choices
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return False  # inf passes every lower bound (--window inf trained on nan)
        return (
            (self.multiple is None or value % self.multiple == 0)
            and (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def check(self, value: Any, label: str) -> Any:
        """``value`` (a registry name: its canonical spelling), or EkxError naming ``label``
        (a flag ``--batch-size``, or ``file: 'batch_size'``) and what it admits."""
        if value is None:
            return value
        if isinstance(self.choices, Names):
            names = self.choices
            sep = "," if self.several is True else str(self.several or "")
            parts = [n.strip() for n in str(value).split(sep)] if sep else [str(value)]
            try:
                canonical = [names.canonical(n) for n in parts if n]
            except EkxError as e:
                raise EkxError(f"{label}: {e}" if label else str(e)) from None
            if not canonical or len(set(canonical)) != len(canonical):
                raise EkxError(f"{label} {value!r}: name one or more {names.what}s, each once, separated by {sep!r}")
            return sep.join(canonical)
        if not self.admits(value):
            raise EkxError(f"{label} must be {self.describe()}, got {value!r}")
        return value


def opt(default: Any, help: str, **valid: Any) -> Any:
    """A config dataclass field: its default, its help and (``valid``: `Valid`'s fields) what
    it admits, declared together."""
    return field(default=default, metadata={"help": help, **({"valid": Valid(**valid)} if valid else {})})


def again(cls: type, name: str, default: Any, help: str | None = None) -> Any:
    """A subclass's field ``name`` with another default (and help): what it admits stays the
    base class's declaration (FinetuneConfig's epochs are TrainConfig's, from 10)."""
    base = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field(default=default, metadata={**base.metadata, **({"help": help} if help else {})})


def valid_of(cls: type, name: str) -> Valid | None:
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("valid")


def label(origin: str, key: str) -> str:
    """How a key is named in messages: a flag for command-line values, else its file and key."""
    return f"--{key.replace('_', '-')}" if origin == "flags" else f"{origin}: '{key}'"


def check_values(cls: type, values: dict[str, Any], origin: str) -> dict[str, Any]:
    """``values`` of ``cls``'s fields checked against their declarations (names canonical)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = dict(values)
    for k, v in values.items():
        valid = fields[k].metadata.get("valid") if k in fields else None
        if valid is not None:
            out[k] = valid.check(v, label(origin, k))
    return out


def checked(obj: T, origin: str = "flags") -> T:
    """A config dataclass instance with every field checked against its declaration."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return dataclasses.replace(obj, **check_values(type(obj), values, origin))
