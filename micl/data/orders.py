"""Named continual-learning task orders (``eval/orders.yaml``)."""

from __future__ import annotations

from pathlib import Path

from micl.utils.resources import find_resource
from micl.data.tasks import list_tasks
from micl.errors import ConfigError
from micl.utils.io import read_yaml_mapping


def default_orders_path() -> Path:
    return find_resource("eval/orders.yaml")


def load_orders(path=None) -> dict[str, list[str]]:
    """``{name: [task, ...]}`` from the orders file (default: the repository's
    ``eval/orders.yaml``, else the packaged copy)."""
    p = Path(path) if path is not None else default_orders_path()
    data = read_yaml_mapping(p, "a mapping order name -> list of task names")
    out = {}
    for name, tasks in data.items():
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise ConfigError(f"{p}: {name}: expected a non-empty list of task names")
        out[str(name)] = list(tasks)
    return out


def _check_tasks(tasks: list, what: str) -> list[str]:
    known = list_tasks()
    if not tasks:
        raise ConfigError(f"order: {what} is empty")
    for t in tasks:
        if not isinstance(t, str) or t not in known:
            raise ConfigError(f"order: unknown task {t!r} in {what} "
                              f"(known tasks: {', '.join(known)})")
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        raise ConfigError(f"order: task(s) {', '.join(dup)} appear more than once in {what}")
    return list(tasks)


def resolve_order(order, path=None) -> list[str]:
    """Task names of an order.

    ``order`` is a name from the orders file (``order1``, ``order2``, ``quick``...), a
    list of task names, a comma-separated string of task names, or one task name.
    Raises ``ConfigError`` naming the key ``order``.
    """
    if isinstance(order, str):
        name = order.strip()
        orders = load_orders(path)
        if name in orders:
            return _check_tasks(orders[name], f"order {name!r}")
        if "," in name:
            return _check_tasks([t.strip() for t in name.split(",") if t.strip()],
                                f"the list {name!r}")
        if name in list_tasks():
            return [name]
        raise ConfigError(f"order: unknown order {order!r} (valid names: "
                          f"{', '.join(orders)}; or a list of task names: "
                          f"{', '.join(list_tasks())})")
    if isinstance(order, (list, tuple)):
        return _check_tasks(list(order), "the given list")
    raise ConfigError(f"order: expected an order name or a list of task names, "
                      f"got {type(order).__name__}")
