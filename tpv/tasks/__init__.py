"""Task registry: rows -> text-to-text examples, label words, metric, splits, user tasks from files.

Split protocol (the paper's, after SPoT/ATTEMPT, adapted to sources without an official held-out set). All
carving is seeded (``SplitProtocol.seed``) and deterministic, and takes whole groups when ``group_field`` is set
(rows sharing e.g. an evidence passage or a duplicated text never straddle two splits):

- The source's own held-out set (BoolQ dev, or a user's validation/test file) is the "original validation set".
  A source without one first has one carved from its rows: ``test_fraction`` (10%) of them for a large source,
  twice that for a small one.
- Large (train pool >= 10,000 rows): validation = 1,000 rows carved from the train pool; test = the held-out set.
- Small (< 10,000): train = the whole pool; the held-out set is halved into validation and test.
- A user task that gives all three splits keeps them as they are.

Built-in tasks are split once by ``tpv data fetch`` (``tpv.data_fetch``) and read back from
``data_dir()/<task>/{train,validation,test}.jsonl``; file-backed user tasks are split the same way on load.
"""

from tpv.tasks.builtin import BUILTIN_TASKS
from tpv.tasks.registry import (
    BadSplitRequest,
    UnknownTaskError,
    few_shot,
    get_task,
    list_tasks,
    load_split,
    register_task,
    register_task_file,
    require_data,
    task_data_dir,
)
from tpv.tasks.spec import (
    SPLITS,
    DataSource,
    Example,
    Split,
    SplitProtocol,
    TaskConfigError,
    TaskDataMissing,
    TaskSpec,
)
from tpv.tasks.splits import carve, make_splits
from tpv.tasks.user import UserTaskConfig, load_task_file

__all__ = [
    "BUILTIN_TASKS", "SPLITS", "BadSplitRequest", "DataSource", "Example", "Split", "SplitProtocol", "TaskConfigError",
    "TaskDataMissing", "TaskSpec", "UnknownTaskError", "UserTaskConfig", "carve", "few_shot", "get_task",
    "list_tasks", "load_split", "load_task_file", "make_splits", "register_task", "register_task_file",
    "require_data",
    "task_data_dir",
]
