"""vmmd.record: the records' behaviour every other module relies on (what dataclasses
and then msgspec gave before): construction, defaults, equality, hashing, frozenness,
replace and asdict."""

from __future__ import annotations

import copy
import pickle
import threading
from typing import ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmd import record
from vmmd.record import Record, field


class Point(Record):
    x: int
    y: int = 0
    tag: str | None = None


class Other(Record):
    x: int
    y: int = 0
    tag: str | None = None


class Held(Record, frozen=False):
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: set[int] = field(default_factory=set)


class Identity(Record, frozen=False, eq=False):
    name: str


class Derived(Record, frozen=False):
    a: int
    b: int = 0

    def __post_init__(self) -> None:
        self.b = self.a * 2


class One(Record):
    only: int


class Empty(Record):
    pass


values = st.tuples(st.integers(), st.integers(), st.none() | st.text(max_size=5))


@given(values)
def test_positional_and_keyword_make_the_same_record(v: tuple[int, int, str | None]) -> None:
    x, y, tag = v
    p = Point(x, y, tag)
    assert p == Point(x=x, y=y, tag=tag) == Point(x, tag=tag, y=y)
    assert hash(p) == hash(Point(x, y, tag))
    assert (p.x, p.y, p.tag) == v
    assert record.asdict(p) == {"x": x, "y": y, "tag": tag}
    assert Point(**record.asdict(p)) == p
    assert repr(p) == f"Point(x={x!r}, y={y!r}, tag={tag!r})"
    assert pickle.loads(pickle.dumps(p)) == p
    assert copy.copy(p) == p


@given(values, values)
def test_equal_exactly_when_every_field_is(a: tuple[int, int, str | None],
                                           b: tuple[int, int, str | None]) -> None:
    assert (Point(*a) == Point(*b)) == (a == b)
    assert Point(*a) != Other(*a)  # same fields, another class: not equal
    assert Point(*a) != a


@given(values, st.integers())
def test_replace_changes_only_the_named_fields(v: tuple[int, int, str | None], y: int) -> None:
    p = Point(*v)
    q = record.replace(p, y=y)
    assert (q.x, q.y, q.tag) == (v[0], y, v[2])
    assert p == Point(*v)  # the original untouched
    assert type(q) is Point


def test_defaults_and_fields_in_order() -> None:
    assert Point(1) == Point(1, 0, None)
    assert Point._fields == ("x", "y", "tag")
    assert One(3)._fields == ("only",) and hash(One(3)) == hash((3,))
    assert Empty() == Empty() and record.asdict(Empty()) == {}


def test_a_frozen_record_refuses_changes() -> None:
    p = Point(1)
    with pytest.raises(AttributeError, match="Point is frozen"):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(AttributeError, match="Point is frozen"):
        del p.x  # type: ignore[misc]
    assert p.x == 1


def test_default_factories_make_a_value_per_record() -> None:
    a, b = Held("a"), Held("b")
    assert a.seen is not b.seen and a.lock is not b.lock
    a.seen.add(1)
    assert b.seen == set()
    a.name = "changed"  # frozen=False: mutable
    assert a.name == "changed"
    with pytest.raises(AttributeError, match="Held has no field 'nmae'"):
        a.nmae = "typo"  # type: ignore[attr-defined]


def test_a_mutable_record_is_not_hashable_and_identity_records_are() -> None:
    with pytest.raises(TypeError, match="unhashable"):
        hash(Held("a"))
    i, j = Identity("x"), Identity("x")
    assert i != j and i == i and len({i, j}) == 2


def test_post_init_runs_after_the_fields_are_set() -> None:
    assert Derived(3).b == 6
    assert record.replace(Derived(3), a=5).b == 10


@pytest.mark.parametrize("call, message", [
    (Point, "Point() is missing field 'x'"),
    (lambda: Point(1, 2, "t", 4), "Point() takes 3 positional arguments, 4 given"),
    (lambda: Point(1, z=2), "Point() has no field 'z'"),
    (lambda: Point(1, x=2), "Point() got 'x' twice"),
    (lambda: record.replace(Point(1), z=2), "Point has no field 'z'"),
])
def test_bad_arguments_are_refused(call, message) -> None:
    with pytest.raises(TypeError) as e:
        call()
    assert str(e.value) == message


def test_class_definitions_that_would_misbehave_are_refused() -> None:
    with pytest.raises(TypeError, match="a list default would be shared"):
        class Shared(Record):
            items: list[int] = []  # noqa: RUF012
    with pytest.raises(TypeError, match="b: a field without a default follows a"):
        class Order(Record):
            a: int = 0
            b: int
    with pytest.raises(TypeError, match="Sub: a record cannot extend another record"):
        class Sub(Point):
            z: int = 0
    with pytest.raises(TypeError, match="size: a field's default must be a value, not a "
                                        "property"):
        class Shadowed(Record):
            size: int

            @property  # type: ignore[no-redef]
            def size(self) -> int:
                return 1
    with pytest.raises(TypeError, match="Equal: a record's equality is its fields'"):
        class Equal(Record):  # noqa: PLW1641 - refused before any hash matters
            a: int

            def __eq__(self, other: object) -> bool:
                return True


def test_class_variables_are_not_fields_and_patterns_match_fields() -> None:
    class Counted(Record):
        made: ClassVar[int] = 0
        name: str = "x"

    assert Counted._fields == ("name",) and Counted.made == 0
    match Point(1, 2):
        case Point(x, y):
            assert (x, y) == (1, 2)
        case _:
            raise AssertionError("no match")
