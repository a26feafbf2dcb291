"""``qeval-tasks``: list the task plugins by family, with where each reads its data.

qeval-tasks                       # tasks/ and QEVAL_TASKS_PATH
qeval-tasks --include ~/my_tasks  # plus a folder of your own plugins
qeval-tasks --family dialogue
"""

from __future__ import annotations

import argparse
import logging

from qeval.eval.registry import list_tasks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="qeval-tasks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--include", action="append", default=[], help="another folder of task plugins")
    parser.add_argument("--family", default=None, help="only this family")
    args = parser.parse_args(argv)
    for noisy in ("lm_eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    infos = [t for t in list_tasks(args.include) if args.family in (None, t.family)]
    if not infos:
        raise SystemExit(f"no tasks{' in family ' + args.family if args.family else ''}")
    family = None
    for t in infos:
        if t.family != family:
            family = t.family
            print(f"\n{family}")
        arrow = "higher is better" if t.higher_is_better else "lower is better"
        print(f"  {t.name:<32} {t.kind:<14} {t.primary_metric} ({arrow})")
        if t.description and t.kind in ("lm_eval group", "lm_eval online"):
            print(f"  {'':<32} {t.description}")
        if t.data:
            print(f"  {'':<32} data: {t.data}")
    print(f"\n{len(infos)} tasks; lm-eval's own tasks are usable by name too (online).")


if __name__ == "__main__":
    main()
