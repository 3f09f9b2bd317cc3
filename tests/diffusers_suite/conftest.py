"""Run diffusers' scheduler tests on identity-wrapped schedulers when TIMETUNER_WRAPPED=1: every test class's
`scheduler_classes` become TunedScheduler subclasses over the same solver, holding no table."""

import os

CREATED: list[str] = []  # the solver of every wrapped scheduler a test built
WRAPPED: list[str] = []  # the test classes whose schedulers were wrapped


class _SameSolver(type):
    """The suite picks inputs per solver class (`scheduler_class in (EulerDiscreteScheduler, …)`): a wrapped class
    compares equal to the class it wraps, so each test feeds it what it feeds that solver."""

    def __eq__(cls, other):
        return other is cls or other is cls.__dict__.get("_solver")

    __hash__ = type.__hash__


def wrapped(cls):
    from timetuner.scheduler import TunedScheduler

    class Wrapped(TunedScheduler, metaclass=_SameSolver):
        _solver = cls

        def __init__(self, **config):
            config.pop("solver_class", None)
            super().__init__(solver_class=cls.__name__, **config)
            CREATED.append(cls.__name__)

        @classmethod
        def from_config(klass, config=None, return_unused_kwargs=False, **kwargs):
            config = {**dict(config or {}), **kwargs}
            config.pop("_class_name", None)
            config["solver_class"] = cls.__name__
            return super().from_config(config, return_unused_kwargs)

    Wrapped.__name__ = Wrapped.__qualname__ = f"Tuned{cls.__name__}"
    return Wrapped


def pytest_collection_modifyitems(items):
    if os.environ.get("TIMETUNER_WRAPPED") != "1":
        return
    from timetuner.scheduler import TunedScheduler

    done = set()
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is None or cls in done or not getattr(cls, "scheduler_classes", None):
            continue
        done.add(cls)
        WRAPPED.append(cls.__name__)
        cls.scheduler_classes = tuple(c if issubclass(c, TunedScheduler) else wrapped(c)  # subclasses share it
                                      for c in cls.scheduler_classes)


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("TIMETUNER_WRAPPED") == "1":
        terminalreporter.write_line(f"timetuner-wrapped: {len(WRAPPED)} test classes, {len(CREATED)} wrapped "
                                    f"schedulers over {', '.join(sorted(set(CREATED)))}")
