"""python -m integrations.lmms_eval.tasks OUT_DIR [TASK] [N]: write a local lmms-eval task with its data (see __init__)."""

import sys

from . import TASKS, write_task

if __name__ == "__main__":
    args = sys.argv[1:]
    if not 1 <= len(args) <= 3 or args[0] in ("-h", "--help"):
        print(f"usage: python -m integrations.lmms_eval.tasks OUT_DIR [TASK] [N]   (tasks: {', '.join(TASKS)}; N: shapes questions)")
        sys.exit(0 if args and args[0] in ("-h", "--help") else 2)
    print(write_task(args[0], *args[1:2], *(int(a) for a in args[2:3])))
