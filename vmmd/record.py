"""Records: the control plane's plain data (specs, plans, infos, saved state).

A record class names its fields with annotations, as a dataclass does.  `Record`
gives it an __init__ (positional or keyword arguments, defaults, default factories
through `field()`, then `__post_init__` if the class has one), equality field by
field between records of the same class, a hash when frozen, a repr, and
`replace()`, `asdict()` and `_fields` (the field names, in order).  Records are
frozen unless the class says `frozen=False`; `eq=False` keeps identity equality.

Written here, not taken from dataclasses or msgspec, because `vmmd run` pays at
every start for whatever defines its ~70 records, and both cost more than this
file: Python 3.11's dataclasses exec() source text for every generated method
(~28 ms for our records, measured) and import inspect; msgspec makes them in C,
but importing it pulls in typing_extensions, inspect, uuid, decimal and datetime
(~24 ms here, measured against `import typing` alone).  A record class costs one
__init_subclass__ call; no method is generated.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any, ClassVar, TypeVar, dataclass_transform

T = TypeVar("T")
R = TypeVar("R", bound="Record")

_MISSING: Any = object()
# Defaults every instance would share and could change: refused at class creation, as
# dataclasses do (use field(default_factory=...)).
_SHARED_MUTABLE = (list, dict, set, bytearray)


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], T]) -> T:
    """A field's default made anew for each record (a lock, a set, a clock reading)."""
    return _Factory(default_factory)  # type: ignore[return-value]


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
class Record:
    _fields: ClassVar[tuple[str, ...]] = ()
    _fieldset: ClassVar[frozenset[str]] = frozenset()
    _defaults: ClassVar[dict[str, Any]] = {}
    _values: ClassVar[Callable[[Any], tuple[Any, ...]]] = staticmethod(lambda r: ())
    _post_init: ClassVar[Callable[[Any], None] | None] = None

    def __init_subclass__(cls, *, frozen: bool = True, eq: bool = True, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls._fields:  # what frozenness, equality and defaults would mean is unclear
            raise TypeError(f"{cls.__name__}: a record cannot extend another record")
        names: list[str] = []
        defaults: dict[str, Any] = {}
        for name, ann in cls.__dict__.get("__annotations__", {}).items():
            if str(ann).startswith(("ClassVar", "typing.ClassVar")):
                continue
            names.append(name)
            default = cls.__dict__.get(name, _MISSING)
            if default is _MISSING:
                continue
            if isinstance(default, _SHARED_MUTABLE):
                raise TypeError(f"{cls.__name__}.{name}: a {type(default).__name__} default "
                                "would be shared by every record; use field(default_factory=)")
            if hasattr(type(default), "__get__"):  # a method or property of that name
                raise TypeError(f"{cls.__name__}.{name}: a field's default must be a value, "
                                f"not a {type(default).__name__}")
            defaults[name] = default
            delattr(cls, name)  # the instance's own value is the field
        for before, after in zip(names, names[1:]):
            if before in defaults and after not in defaults:
                raise TypeError(f"{cls.__name__}.{after}: a field without a default "
                                f"follows {before}, which has one")
        cls._fields = tuple(names)
        cls._fieldset = frozenset(names)
        cls._defaults = defaults
        cls._post_init = getattr(cls, "__post_init__", None)
        setattr(cls, "__match_args__", cls._fields)  # noqa: B010 - mypy: no class attribute
        get = attrgetter(*names) if names else (lambda r: ())
        cls._values = staticmethod(get if len(names) != 1 else (lambda r: (get(r),)))
        if "__eq__" in cls.__dict__ or "__hash__" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: a record's equality is its fields' "
                            "(eq=False: identity)")
        if not eq:
            cls.__eq__ = object.__eq__  # type: ignore[method-assign]
            cls.__hash__ = object.__hash__  # type: ignore[method-assign]
        elif not frozen:
            cls.__hash__ = None  # type: ignore[assignment]  # equal by value, yet mutable
        if frozen:
            cls.__setattr__ = _refuse  # type: ignore[method-assign,assignment]
            cls.__delattr__ = _refuse  # type: ignore[method-assign,assignment]
        else:
            cls.__setattr__ = _set_field  # type: ignore[method-assign,assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        names = cls._fields
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__}() takes {len(names)} positional arguments, "
                            f"{len(args)} given")
        values = dict(zip(names, args))
        if kwargs:
            if not kwargs.keys() <= cls._fieldset:
                unknown = sorted(kwargs.keys() - cls._fieldset)[0]
                raise TypeError(f"{cls.__name__}() has no field {unknown!r}")
            if args and not kwargs.keys().isdisjoint(values):
                twice = sorted(kwargs.keys() & values.keys())[0]
                raise TypeError(f"{cls.__name__}() got {twice!r} twice")
            values.update(kwargs)
        if len(values) < len(names):
            for name, default in cls._defaults.items():
                if name not in values:
                    values[name] = default.make() if type(default) is _Factory else default
            if len(values) < len(names):
                missing = next(n for n in names if n not in values)
                raise TypeError(f"{cls.__name__}() is missing field {missing!r}")
        object.__setattr__(self, "__dict__", values)
        if cls._post_init is not None:
            cls._post_init(self)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return type(self)._values(self) == type(self)._values(other)

    def __hash__(self) -> int:
        return hash(type(self)._values(self))

    def __repr__(self) -> str:
        values = ", ".join(f"{n}={v!r}" for n, v in zip(self._fields, type(self)._values(self)))
        return f"{type(self).__name__}({values})"


def _set_field(self: Record, name: str, value: Any) -> None:
    """A mutable record's fields change; a misspelt name is an error, not a new
    attribute (instances have a __dict__, unlike msgspec's Structs)."""
    if name not in self._fieldset:
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")
    object.__setattr__(self, name, value)


def _refuse(self: Record, name: str, *value: Any) -> None:
    raise AttributeError(f"{type(self).__name__} is frozen: cannot set or delete {name!r}")


def replace(record: R, /, **changes: Any) -> R:
    """A copy of record with the named fields changed."""
    cls = type(record)
    unknown = changes.keys() - cls._fieldset
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {sorted(unknown)[0]!r}")
    return cls(**{**asdict(record), **changes})


def asdict(record: Record) -> dict[str, Any]:
    """The record's fields by name (not recursive: nested records stay records)."""
    return dict(zip(record._fields, type(record)._values(record)))
