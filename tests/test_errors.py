"""One home for user errors (hierdino/errors.py): every error a user fixes is a ``UserError``, found
inside Ray's wrappers through their public attributes, and said by the tools in one line."""

import pytest

from hierdino.errors import UserError, user_error, user_errors


def test_the_errors_a_user_fixes_are_user_errors_and_keep_their_old_bases():
    from hierdino.config import ConfigError
    from hierdino.config.compat import ResumeError
    from hierdino.data.ingest import IngestError
    from hierdino.data.shards import ShardError
    from hierdino.eval import EvalDataError
    from hierdino.hierarchy import HierarchyError
    from hierdino.labels import LabelMapError
    from hierdino.models.weights import WeightsError
    from hierdino.storage import StorageError
    from hierdino.train.preflight import ResourcesError
    from hierdino.tune.space import SpaceError

    kinds = {StorageError: ("storage", OSError), HierarchyError: ("hierarchy", ValueError),
             LabelMapError: ("label map", ValueError), ConfigError: ("config", ValueError),
             ResumeError: ("resume", ConfigError), ShardError: ("data", ValueError), IngestError: ("data", ValueError),
             WeightsError: ("weights", ValueError), EvalDataError: ("eval data", ValueError),
             ResourcesError: ("resources", RuntimeError), SpaceError: ("sweep space", ValueError)}
    for cls, (kind, base) in kinds.items():
        e = cls("what to do")
        assert isinstance(e, UserError) and isinstance(e, base) and e.exit_code == 2, cls
        assert e.line() == f"{kind} error: what to do"


def test_user_error_unwraps_ray_task_train_worker_and_controller_errors():
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    from hierdino.data.shards import ShardError

    bad = ShardError("no manifest at s3://b/x")
    task = RayTaskError("read", "Traceback ...", bad)
    assert user_error(task) is bad
    assert user_error(task.as_instanceof_cause()) is bad  # "RayTaskError(ShardError)": the cause, not the hybrid
    first = ShardError("rank 0's")
    group = WorkerGroupError("2 workers failed", {1: RuntimeError("a bug"), 0: first})
    assert user_error(group) is first  # first rank first
    assert user_error(ControllerError(RayTaskError("f", "tb", bad))) is bad
    try:
        try:
            raise bad
        except ShardError as e:
            raise RuntimeError("while reading") from e
    except RuntimeError as chained:
        assert user_error(chained) is bad
    try:  # an error raised while handling another is not caused by it
        try:
            raise bad
        except ShardError:
            raise RuntimeError("a bug in the handler")
    except RuntimeError as context_only:
        assert user_error(context_only) is None
    assert user_error(WorkerGroupError("1 failed", {0: KeyError("x")})) is None


def test_user_errors_says_the_error_in_one_line_and_keeps_the_traceback_of_a_bug(capsys):
    from hierdino.storage import StorageError

    def raw(argv=None):
        raise {"user": StorageError("cannot read s3://b/x"), "os": FileNotFoundError("no file x"),
               "bug": KeyError("k")}[argv[0]]

    main = user_errors(FileNotFoundError)(raw)
    assert main(["user"]) == 2 and capsys.readouterr().err == "error: cannot read s3://b/x\n"
    assert main(["os"]) == 2 and capsys.readouterr().err == "error: no file x\n"
    with pytest.raises(KeyError):
        main(["bug"])
    assert user_errors(named=True)(raw)(["user"]) == 2
    assert capsys.readouterr().err == "storage error: cannot read s3://b/x\n"
